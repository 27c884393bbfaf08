//! `reports.require_authentication`: whether the receiving MTA authenticated a report's sender,
//! read from the topmost `Authentication-Results` header (RFC 8601).
//!
//! `allowed_senders` checks the From header, which anyone can write. The MTA that accepted the
//! mail for the mailbox records what it verified in an `Authentication-Results` header that it
//! puts on top of the others (RFC 8601 §5: an MTA adds its own above the received ones and
//! removes forged ones that carry its authserv-id), so only the topmost header is trusted, and
//! only when its authserv-id is the configured one.

/// One method result of an `Authentication-Results` header: `dkim=pass header.d=example.com`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MethodResult {
    /// The method (`dkim`, `spf`, `dmarc`, …), lowercase.
    method: String,
    /// The result (`pass`, `fail`, `none`, …), lowercase.
    result: String,
    /// The properties (`header.d`, `smtp.mailfrom`, …) as (lowercase name, value).
    properties: Vec<(String, String)>,
}

/// The authserv-id and the method results of one header value (RFC 8601 §2.2:
/// `authserv-id [version] ; resinfo ; resinfo …`). Comments in parentheses are dropped;
/// quoted values are unquoted. `None` when there is no authserv-id.
fn parse(value: &str) -> Option<(String, Vec<MethodResult>)> {
    let value = strip_comments(value);
    let mut parts = value.split(';');
    let authserv_id = parts
        .next()?
        .split_whitespace()
        .next()?
        .to_ascii_lowercase();
    let results = parts
        .filter_map(|resinfo| {
            let mut words = resinfo.split_whitespace();
            let (method, result) = words.next()?.split_once('=')?;
            let properties = words
                .filter_map(|word| word.split_once('='))
                .map(|(name, value)| {
                    (
                        name.to_ascii_lowercase(),
                        value.trim_matches('"').to_owned(),
                    )
                })
                .collect();
            Some(MethodResult {
                // `dkim/1=pass`: a method version (§2.2) is not part of the name.
                method: method
                    .split('/')
                    .next()
                    .unwrap_or(method)
                    .to_ascii_lowercase(),
                result: result.to_ascii_lowercase(),
                properties,
            })
        })
        .collect();
    Some((authserv_id, results))
}

/// The header value without RFC 5322 comments (nested parentheses; a quoted string is kept).
fn strip_comments(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    for c in value.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// The domain of an address or a bare domain, lowercase (`user@Example.com` → `example.com`).
fn domain_of(value: &str) -> String {
    let value = value.trim().trim_matches(['<', '>']);
    value
        .rsplit_once('@')
        .map_or(value, |(_, domain)| domain)
        .to_ascii_lowercase()
}

/// Checks the topmost of `headers` (the `Authentication-Results` values in header order) for a
/// `dkim=pass` whose `header.d` (or `header.i`) is `sender_domain`, or an `spf=pass` whose
/// `smtp.mailfrom` (or `smtp.helo`) is in it, added by `authserv_id`.
///
/// # Errors
/// Why the mail does not count as authenticated, for the log and the message's detail.
pub fn check(headers: &[String], authserv_id: &str, sender_domain: &str) -> Result<(), String> {
    let Some(topmost) = headers.first() else {
        return Err("it has no Authentication-Results header".into());
    };
    let Some((id, results)) = parse(topmost) else {
        return Err("its topmost Authentication-Results header cannot be read".into());
    };
    if !id.eq_ignore_ascii_case(authserv_id) {
        return Err(format!(
            "its topmost Authentication-Results header is from {id}, not {authserv_id}"
        ));
    }
    let sender_domain = sender_domain.to_ascii_lowercase();
    let passes = |method: &str, properties: &[&str]| {
        results.iter().any(|r| {
            r.method == method
                && r.result == "pass"
                && r.properties.iter().any(|(name, value)| {
                    properties.contains(&name.as_str()) && domain_of(value) == sender_domain
                })
        })
    };
    if passes("dkim", &["header.d", "header.i"]) || passes("spf", &["smtp.mailfrom", "smtp.helo"]) {
        Ok(())
    } else {
        Err(format!(
            "{authserv_id} reports neither dkim=pass nor spf=pass for {sender_domain}"
        ))
    }
}

/// [`check`] for the domain of the From address `from` (`local@domain`).
///
/// # Errors
/// As [`check`], or the mail has no From address.
pub fn check_from(headers: &[String], authserv_id: &str, from: Option<&str>) -> Result<(), String> {
    match from.and_then(|from| from.rsplit_once('@')) {
        Some((_, domain)) => check(headers, authserv_id, domain),
        None => Err("it has no From address".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check1(header: &str, domain: &str) -> Result<(), String> {
        check(&[header.to_owned()], "mx.example.com", domain)
    }

    #[test]
    fn a_dkim_or_spf_pass_for_the_sender_domain_is_enough() {
        // RFC 8601 appendix B.4 and B.6 style headers.
        assert_eq!(
            check1(
                "mx.example.com; dkim=pass (good signature) header.d=bi.example.com header.s=s1",
                "bi.example.com"
            ),
            Ok(())
        );
        assert_eq!(
            check1(
                "mx.example.com 1; spf=pass smtp.mailfrom=superset@BI.example.com; dkim=none",
                "bi.example.com"
            ),
            Ok(())
        );
        assert_eq!(
            check1(
                "MX.Example.COM; dkim/1=pass header.i=\"@bi.example.com\"",
                "bi.example.com"
            ),
            Ok(())
        );
    }

    #[test]
    fn a_fail_another_domain_or_another_server_is_refused() {
        let refused = |header: &str| check1(header, "bi.example.com").unwrap_err();
        assert!(refused("mx.example.com; dkim=fail header.d=bi.example.com; spf=softfail smtp.mailfrom=bi.example.com")
            .contains("neither"));
        assert!(refused("mx.example.com; dkim=pass header.d=evil.example.org").contains("neither"));
        assert!(
            refused("mx.example.com; dkim=pass (header.d=bi.example.com) header.d=evil.org")
                .contains("neither")
        );
        assert!(refused("mx.example.com; none").contains("neither"));
        assert!(
            refused("relay.evil.org; dkim=pass header.d=bi.example.com")
                .contains("from relay.evil.org")
        );
        assert!(refused("").contains("cannot be read"));
        assert!(
            check(&[], "mx.example.com", "bi.example.com")
                .unwrap_err()
                .contains("no Authentication-Results")
        );
    }

    #[test]
    fn only_the_topmost_header_counts() {
        let headers = [
            "mx.example.com; dkim=fail header.d=bi.example.com".to_owned(),
            // Added by the sender to look authenticated; below the receiving MTA's own.
            "mx.example.com; dkim=pass header.d=bi.example.com".to_owned(),
        ];
        assert!(check(&headers, "mx.example.com", "bi.example.com").is_err());
    }
}
