//! IMAP wire helpers with no I/O: FETCH attributes to a [`FetchedMessage`], INTERNALDATE
//! (RFC 3501 §9), modified UTF-7 mailbox names (§5.1.3) and quoted strings (§4.3).

use std::time::{Duration, SystemTime};

use async_imap::imap_proto::AttributeValue;

use super::FetchedMessage;

/// A [`FetchedMessage`] from one FETCH response, if it carries a UID and the whole body.
pub(super) fn fetched_message(
    attributes: &[AttributeValue<'_>],
    uid_validity: u32,
) -> Option<FetchedMessage> {
    let mut uid = None;
    let mut raw = None;
    let mut internal_date = None;
    for attribute in attributes {
        match attribute {
            AttributeValue::Uid(value) => uid = Some(*value),
            AttributeValue::InternalDate(text) => internal_date = parse_internal_date(text),
            AttributeValue::BodySection {
                section: None,
                index: None,
                data,
            } => raw = Some(data.as_deref().unwrap_or_default().to_vec()),
            _ => {}
        }
    }
    Some(FetchedMessage {
        uid_validity,
        uid: uid?,
        raw: raw?,
        internal_date,
        fetch_error: None,
    })
}

/// Parses an IMAP `date-time` (RFC 3501 §9): `dd-Mon-yyyy hh:mm:ss +zzzz`, the day possibly
/// space-padded.
pub(super) fn parse_internal_date(text: &str) -> Option<SystemTime> {
    pub(super) const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut parts = text.split_whitespace();
    let (date, time, zone) = (parts.next()?, parts.next()?, parts.next()?);
    let mut date = date.split('-');
    let day: i64 = date.next()?.parse().ok()?;
    let month_name = date.next()?;
    let month = MONTHS
        .iter()
        .position(|name| name.eq_ignore_ascii_case(month_name))?;
    let year: i64 = date.next()?.parse().ok()?;
    let mut time = time.split(':');
    let hour: i64 = time.next()?.parse().ok()?;
    let minute: i64 = time.next()?.parse().ok()?;
    let second: i64 = time.next()?.parse().ok()?;
    let (sign, digits) = match zone.as_bytes().first()? {
        b'+' => (1, zone.get(1..)?),
        b'-' => (-1, zone.get(1..)?),
        _ => return None,
    };
    if digits.len() != 4 || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let zone_minutes: i64 =
        digits.get(..2)?.parse::<i64>().ok()? * 60 + digits.get(2..)?.parse::<i64>().ok()?;
    let month = i64::try_from(month).ok()? + 1;
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - sign * zone_minutes * 60;
    let seconds = u64::try_from(seconds).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
pub(super) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A mailbox name in modified UTF-7 (RFC 3501 §5.1.3): printable ASCII as is (`&` as `&-`),
/// anything else as `&` + modified BASE64 of UTF-16BE + `-`.
pub(super) fn encode_mailbox_name(name: &str) -> String {
    use base64::Engine as _;
    let mut out = String::with_capacity(name.len());
    let mut pending: Vec<u16> = Vec::new();
    let flush = |out: &mut String, pending: &mut Vec<u16>| {
        if pending.is_empty() {
            return;
        }
        let bytes: Vec<u8> = pending.iter().flat_map(|unit| unit.to_be_bytes()).collect();
        let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes);
        out.push('&');
        out.push_str(&encoded.replace('/', ","));
        out.push('-');
        pending.clear();
    };
    for character in name.chars() {
        if (' '..='~').contains(&character) {
            flush(&mut out, &mut pending);
            if character == '&' {
                out.push_str("&-");
            } else {
                out.push(character);
            }
        } else {
            let mut units = [0_u16; 2];
            pending.extend_from_slice(character.encode_utf16(&mut units));
        }
    }
    flush(&mut out, &mut pending);
    out
}

/// An IMAP quoted string (RFC 3501 §4.3).
pub(super) fn quote(text: &str) -> anyhow::Result<String> {
    if text.contains(['\r', '\n', '\0']) {
        anyhow::bail!("the folder name contains a line break or NUL");
    }
    Ok(format!(
        "\"{}\"",
        text.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}
