//! What the HTML body of a Superset mail says: the description, the "Explore in Superset" link
//! and TEXT-format tables rendered as aligned text.

use super::Link;
use scraper::{ElementRef, Html, node::Node};

/// The call-to-action text Superset puts on its link (`EMAIL_REPORTS_CTA`).
pub(super) const SUPERSET_CTA: &str = "Explore in Superset";

/// What the body of a mail says, as plain text.
#[derive(Debug, Default)]
pub(super) struct HtmlSummary {
    pub(super) description: String,
    pub(super) link: Option<Link>,
    pub(super) tables: Vec<String>,
}

impl HtmlSummary {
    pub(super) fn from_text(text: &str) -> Self {
        let description = text
            .lines()
            .map(|line| collapse_whitespace(line).trim().to_owned())
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        Self {
            description,
            ..Self::default()
        }
    }

    /// Superset's template is `<div>description</div><br><b><a href=URL>Explore in
    /// Superset</a></b><p></p>{table}{images}`; its error template puts the error in `<p>`s
    /// before the link. So the description is the text before the call-to-action link.
    pub(super) fn from_html(html: &str) -> Self {
        let document = Html::parse_document(html);
        let root = document.root_element();
        let anchors: Vec<ElementRef<'_>> = root
            .descendent_elements()
            .filter(|e| e.value().name() == "a" && e.attr("href").is_some())
            .collect();
        let cta = anchors
            .iter()
            .find(|a| collapse_whitespace(&a.text().collect::<String>()).trim() == SUPERSET_CTA)
            .or_else(|| {
                anchors.iter().find(|a| {
                    a.parent()
                        .and_then(ElementRef::wrap)
                        .is_some_and(|p| matches!(p.value().name(), "b" | "strong"))
                })
            })
            .copied();
        let link = cta.map(|a| Link {
            url: a.attr("href").unwrap_or_default().trim().to_owned(),
            text: collapse_whitespace(&a.text().collect::<String>())
                .trim()
                .to_owned(),
        });

        let mut text = TextCollector {
            stop_at: cta,
            stopped: false,
            lines: Vec::new(),
            current: String::new(),
        };
        text.walk(root);
        text.break_line();
        let description = text.lines.join("\n");

        let tables = root
            .descendent_elements()
            .filter(|e| e.value().name() == "table")
            // A nested table is rendered as part of its outer table's cell text.
            .filter(|e| {
                !e.ancestors()
                    .filter_map(ElementRef::wrap)
                    .any(|a| a.value().name() == "table")
            })
            .map(table_to_text)
            .filter(|t| !t.is_empty())
            .collect();
        Self {
            description,
            link,
            tables,
        }
    }
}

/// Collects the visible text before the call-to-action link, one line per block element.
pub(super) struct TextCollector<'a> {
    pub(super) stop_at: Option<ElementRef<'a>>,
    pub(super) stopped: bool,
    pub(super) lines: Vec<String>,
    pub(super) current: String,
}

impl<'a> TextCollector<'a> {
    pub(super) fn walk(&mut self, element: ElementRef<'a>) {
        for child in element.children() {
            if self.stopped {
                return;
            }
            match child.value() {
                Node::Text(text) => self.current.push_str(text),
                Node::Element(e) => {
                    if self.stop_at.is_some() && ElementRef::wrap(child) == self.stop_at {
                        self.stopped = true;
                        return;
                    }
                    let name = e.name();
                    if matches!(
                        name,
                        "head" | "style" | "script" | "title" | "table" | "img" | "template"
                    ) {
                        continue;
                    }
                    let block = is_block(name);
                    if block || name == "br" {
                        self.break_line();
                    }
                    if name == "li" {
                        self.current.push_str("• ");
                    }
                    if let Some(child) = ElementRef::wrap(child) {
                        self.walk(child);
                    }
                    if block {
                        self.break_line();
                    }
                }
                _ => {}
            }
        }
    }

    pub(super) fn break_line(&mut self) {
        let line = collapse_whitespace(&self.current).trim().to_owned();
        self.current.clear();
        if !line.is_empty() && line != "•" {
            self.lines.push(line);
        }
    }
}

pub(super) fn is_block(name: &str) -> bool {
    matches!(
        name,
        "p" | "div"
            | "ul"
            | "ol"
            | "li"
            | "blockquote"
            | "h1"
            | "h2"
            | "h3"
            | "h4"
            | "h5"
            | "h6"
            | "pre"
            | "tr"
            | "section"
            | "article"
            | "header"
            | "footer"
            | "hr"
    )
}

pub(super) fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            space = true;
        } else {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c);
        }
    }
    if space && !out.is_empty() {
        out.push(' ');
    }
    out
}

/// Renders an HTML table as aligned plain text: columns padded to their widest cell (by
/// display width), two spaces apart, with a dashed rule under a header row.
pub(super) fn table_to_text(table: ElementRef<'_>) -> String {
    use unicode_width::UnicodeWidthStr;
    let mut rows: Vec<(bool, Vec<String>)> = Vec::new();
    for row in table
        .descendent_elements()
        .filter(|e| e.value().name() == "tr")
    {
        let cells: Vec<ElementRef<'_>> = row
            .child_elements()
            .filter(|c| matches!(c.value().name(), "td" | "th"))
            .collect();
        if cells.is_empty() {
            continue;
        }
        let header = row
            .ancestors()
            .filter_map(ElementRef::wrap)
            .any(|a| a.value().name() == "thead")
            || cells.iter().all(|c| c.value().name() == "th");
        let texts = cells
            .iter()
            .map(|c| {
                collapse_whitespace(&c.text().collect::<String>())
                    .trim()
                    .to_owned()
            })
            .collect();
        rows.push((header, texts));
    }
    let columns = rows.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for (_, row) in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.width());
        }
    }
    let mut lines = Vec::with_capacity(rows.len() + 1);
    let mut previous_header = false;
    for (header, row) in &rows {
        if previous_header && !header {
            let rule = widths
                .iter()
                .map(|w| "-".repeat(*w))
                .collect::<Vec<_>>()
                .join("  ");
            lines.push(rule);
        }
        previous_header = *header;
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            let cell = row.get(i).map(String::as_str).unwrap_or("");
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.push_str(&" ".repeat(width - cell.width()));
        }
        lines.push(line.trim_end().to_owned());
    }
    lines.join("\n")
}
