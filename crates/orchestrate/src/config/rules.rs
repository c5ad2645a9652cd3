//! The rules a kind of value follows wherever it appears — durations, integers, names and tag
//! text, paths, mount options — and how a value is quoted in a message. Each rule lives here
//! once, so a field cannot forget one.

use std::path::Path;
use std::time::Duration;

/// The shortest and longest duration a setting accepts.
pub(super) const MIN_DURATION: Duration = Duration::from_secs(1);
pub(super) const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Tags AWS allows on one resource.
pub(super) const MAX_TAGS: usize = 50;

/// A value quoted for a message: Rust string syntax (control characters escaped), cut to a
/// readable length so a huge value cannot flood the terminal or the journal.
pub(crate) fn shown(value: &str) -> String {
    const KEEP: usize = 60;
    let count = value.chars().count();
    if count <= KEEP + 20 {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(KEEP).collect();
    format!("{:?}… ({count} characters)", head)
}

/// Why a duration does not parse.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DurationError {
    Empty,
    /// Something that is neither digits nor one of the units.
    Syntax,
    /// A unit after a smaller or the same one (`1h1h`, `30s1m`).
    Order,
    Overflow,
}

impl DurationError {
    pub(super) fn hint(&self) -> &'static str {
        match self {
            Self::Empty => "it is empty",
            Self::Syntax => "the units are h, m, s and ms, each after a number",
            Self::Order => "each unit may appear once, largest first (1h30m, not 30m1h or 1h1h)",
            Self::Overflow => "the number is too large",
        }
    }
}

/// `90` (seconds), `90s`, `1500ms`, `3m`, `1h`, `1m30s`: digits and a unit, units from the
/// largest down and each at most once, so every duration has one reading.
pub(super) fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| DurationError::Overflow);
    }
    // Units in the only order they may come; `rank` is the index of the last one used.
    const UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];
    let mut rank: Option<usize> = None;
    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(DurationError::Syntax);
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::Overflow)?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let Some(index) = UNITS.iter().position(|(u, _)| *u == &rest[..unit_len]) else {
            return Err(DurationError::Syntax);
        };
        if rank.is_some_and(|r| index <= r) {
            return Err(DurationError::Order);
        }
        rank = Some(index);
        total_ms = n
            .checked_mul(UNITS[index].1)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or(DurationError::Overflow)?;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_millis(total_ms))
}

/// An integer as written in the file (`raw`, quotes included) — a plain decimal number. YAML
/// would also read `0x10`, `0o17`, `1_000`, `010` or `"200"` as one, which the documentation
/// does not promise and a reader of the file may not expect; those are refused, naming the
/// number to write instead.
pub(super) fn integer(raw: &str) -> Result<i64, String> {
    let unquoted = ['"', '\'']
        .iter()
        .find_map(|q| raw.strip_prefix(*q).and_then(|r| r.strip_suffix(*q)));
    let text = unquoted.unwrap_or(raw);
    let digits = text.strip_prefix('-').unwrap_or(text);
    let plain = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if plain && unquoted.is_none() {
        return text
            .parse()
            .map_err(|_| format!("{} is too large a number", shown(raw)));
    }
    match (unquoted.is_some(), yaml_reading(text)) {
        (true, Some(n)) => Err(format!(
            "{} is quoted text, not a number; write {n} without quotes",
            shown(raw)
        )),
        (false, Some(n)) => Err(format!(
            "{} is not a plain decimal number; write {n}",
            shown(raw)
        )),
        (_, None) => Err(format!(
            "{} is not a number; write a whole number like 200",
            shown(raw)
        )),
    }
}

/// What a YAML reader would take `text` for: decimal with a sign, leading zeros or
/// underscores, or hexadecimal, octal, binary.
fn yaml_reading(text: &str) -> Option<i64> {
    let (negative, body) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let body = body.replace('_', "");
    let (radix, digits) = match body.get(..2) {
        Some("0x" | "0X") => (16, &body[2..]),
        Some("0o" | "0O") => (8, &body[2..]),
        Some("0b" | "0B") => (2, &body[2..]),
        _ => (10, body.as_str()),
    };
    if digits.is_empty() {
        return None;
    }
    let n = i64::from_str_radix(digits, radix).ok()?;
    Some(if negative { -n } else { n })
}

/// Names and tag text: no control characters (a NUL or a newline in a tag or a hook name is a
/// typo at best, and breaks the log, the env file and AWS's own checks), and at most `max`
/// characters — AWS counts characters, not bytes.
pub(super) fn text_problem(value: &str, min: usize, max: usize) -> Option<String> {
    if let Some((i, c)) = value.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Some(format!(
            "contains the control character U+{:04X} at character {}; remove it",
            u32::from(c),
            i + 1
        ));
    }
    let count = value.chars().count();
    if count < min || count > max {
        let range = if min == 0 {
            format!("at most {max}")
        } else {
            format!("{min} to {max}")
        };
        return Some(format!("must be {range} characters (it has {count})"));
    }
    None
}

/// What is wrong with a tag key, if anything.
pub(super) fn tag_key_problem(key: &str) -> Option<String> {
    if let Some(p) = text_problem(key, 1, 128) {
        return Some(p);
    }
    if key.to_ascii_lowercase().starts_with("aws:") {
        return Some("uses the reserved aws: prefix; choose another key".into());
    }
    None
}

/// What is wrong with a tag value, if anything.
pub(super) fn tag_value_problem(value: &str) -> Option<String> {
    text_problem(value, 0, 256)
}

/// A KMS key as EBS takes it: a key id (`1234abcd-…`, `mrk-…`), `alias/NAME`, or a key or
/// alias ARN — at most 2048 characters, like KMS's own limit.
pub(super) fn kms_key_problem(id: &str) -> Option<String> {
    if let Some(p) = text_problem(id, 1, 2048) {
        return Some(p);
    }
    let key_id = id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let alias = id
        .strip_prefix("alias/")
        .is_some_and(|name| !name.is_empty() && !name.contains(char::is_whitespace));
    let arn = id.starts_with("arn:") && !id.contains(char::is_whitespace);
    if key_id || alias || arn {
        return None;
    }
    Some(format!(
        "{} is not a key id, alias/NAME or an ARN (like alias/cps-data or \
         arn:aws:kms:REGION:ACCOUNT:key/ID)",
        shown(id)
    ))
}

/// Paths in the configuration are absolute and say what they mean: no `.` or `..` (`/a/..` is
/// `/`), and no control characters (they would break the fstab line or the env file).
pub(super) fn path_problem(path: &str) -> Option<String> {
    if let Some((i, c)) = path.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Some(format!(
            "contains the control character U+{:04X} at character {}; remove it",
            u32::from(c),
            i + 1
        ));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Some("must be an absolute path (starting with /)".into());
    }
    // Looked for in the text: `Path::components` quietly drops a `.` in the middle.
    if path.split('/').any(|part| part == "." || part == "..") {
        return Some("must not contain . or .. components; write the path they lead to".into());
    }
    // Linux's PATH_MAX and NAME_MAX: a longer path cannot be created or opened.
    if path.len() >= 4096 {
        return Some(format!("is {} bytes long; Linux allows 4095", path.len()));
    }
    if let Some(part) = path.split('/').find(|part| part.len() > 255) {
        return Some(format!(
            "has a {}-byte name ({}); Linux allows 255 bytes per name",
            part.len(),
            shown(part)
        ));
    }
    None
}

/// A mount option goes into mount(2)'s data and into an fstab line, whose fields are separated
/// by whitespace and where `#` starts a comment.
pub(super) fn mount_option_problem(option: &str) -> Option<String> {
    if option.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some(
            "contains whitespace or a control character; separate options with commas".into(),
        );
    }
    if option.contains('#') {
        return Some("contains #, which starts a comment in fstab".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_have_one_reading() {
        let ok = |t: &str, ms: u64| assert_eq!(parse_duration(t), Ok(Duration::from_millis(ms)));
        ok("90", 90_000);
        ok("90s", 90_000);
        ok("1m30s", 90_000);
        ok("1h30m15s500ms", 5_415_500);
        ok("1500ms", 1_500);
        ok("90m", 5_400_000);
        let bad = |t: &str, e: DurationError| assert_eq!(parse_duration(t), Err(e), "{t}");
        bad("", DurationError::Empty);
        bad("1h1h", DurationError::Order);
        bad("30s1m", DurationError::Order);
        bad("1s1s", DurationError::Order);
        bad("+90", DurationError::Syntax);
        bad("1.5s", DurationError::Syntax);
        bad("m", DurationError::Syntax);
        bad("5 minutes", DurationError::Syntax);
        bad("1d", DurationError::Syntax);
        bad("99999999999999999999", DurationError::Overflow);
        bad("9999999999999999h", DurationError::Overflow);
    }

    #[test]
    fn integers_are_plain_decimal() {
        assert_eq!(integer("200"), Ok(200));
        assert_eq!(integer("0"), Ok(0));
        assert_eq!(integer("-3"), Ok(-3));
        for (raw, hint) in [
            ("0x10", "write 16"),
            ("0o20", "write 16"),
            ("0b10000", "write 16"),
            ("1_6", "write 16"),
            ("016", "write 16"),
            ("+16", "write 16"),
            ("\"16\"", "write 16 without quotes"),
            ("'16'", "write 16 without quotes"),
            ("big", "not a number"),
            ("1.5", "not a number"),
            ("99999999999999999999", "too large"),
        ] {
            let e = integer(raw).unwrap_err();
            assert!(e.contains(hint), "{raw}: {e}");
        }
    }

    #[test]
    fn text_is_counted_in_characters_and_has_no_control_characters() {
        assert_eq!(text_problem(&"é".repeat(128), 1, 128), None);
        assert!(text_problem(&"é".repeat(129), 1, 128).is_some());
        assert!(text_problem("a\0b", 0, 10).unwrap().contains("U+0000"));
        assert!(text_problem("a\u{7}", 0, 10).unwrap().contains("U+0007"));
        assert!(text_problem("a\u{85}", 0, 10).is_some(), "C1 controls too");
        assert!(text_problem("", 1, 10).is_some());
        assert!(tag_key_problem("AWS:x").unwrap().contains("aws:"));
    }

    #[test]
    fn paths_say_what_they_mean() {
        assert_eq!(path_problem("/var/lib/kafka"), None);
        assert_eq!(path_problem("/data/"), None);
        for bad in [
            "/a/..", "/a/../b", "/a/./b", "/.", "relative", "/a\nb", "/a\0",
        ] {
            assert!(path_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(path_problem(&format!("/{}", "x".repeat(255))), None);
        assert!(path_problem(&format!("/{}", "x".repeat(256))).is_some());
        assert!(path_problem(&"/x".repeat(2048)).is_some());
    }

    #[test]
    fn long_values_are_cut_when_shown() {
        let long = "x".repeat(5 << 20);
        let s = shown(&long);
        assert!(s.len() < 100, "{s}");
        assert!(s.contains("5242880 characters"), "{s}");
        assert_eq!(shown("a\u{1b}b"), "\"a\\u{1b}b\"");
    }
}
