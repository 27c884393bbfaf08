// The check that Telegram HTML the relay rendered has no broken entity. Shared by
// `tests/report_fixtures.rs` (as `support::entities`) and the unit tests of
// `src/report/render.rs` (through `include!`, which is why this file has no inner attributes
// or inner doc comments).

/// Panics unless every `&` in `html` starts one of the four entities the renderer writes
/// (`&amp;`, `&lt;`, `&gt;`, `&quot;`): a cut must never leave half of one.
pub fn assert_no_broken_entity(html: &str) {
    for (at, _) in html.match_indices('&') {
        let rest = &html[at..];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;"]
                .iter()
                .any(|e| rest.starts_with(e)),
            "broken entity at {at}: {rest:.20}"
        );
    }
}
