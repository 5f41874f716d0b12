//! The strict syntax of every recipe string that reaches a tool, a path or a URL.

/// Parse a size: bytes, or a number with K/M/G/T (binary, optional "iB"/"B").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like \"512MiB\", \"1G\" or a number of bytes"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" | "KB" => 1 << 10,
        "M" | "MiB" | "MB" => 1 << 20,
        "G" | "GiB" | "GB" => 1 << 30,
        "T" | "TiB" | "TB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?}: use K, M, G or T (powers of 1024)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

pub(super) fn is_image_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
}

pub(super) fn is_version(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b".+~_-".contains(c))
}

pub(super) fn is_hostname(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

pub(super) fn is_suite(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

pub(super) fn is_package(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 2
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(c))
}

pub(super) fn is_url(s: &str) -> bool {
    (s.starts_with("http://") || s.starts_with("https://") || s.starts_with("file:/"))
        && s.len() <= 512
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

pub(super) fn is_mirror(s: &str) -> bool {
    if is_url(s) {
        return true;
    }
    let words: Vec<&str> = s.split_whitespace().collect();
    if s.chars().any(|c| c.is_control()) || words.len() < 4 || words[0] != "deb" {
        return false;
    }
    // `deb [options] URL SUITE COMPONENT...` without options (they could redirect trust).
    is_url(words[1]) && words[2..].iter().all(|w| is_suite(w))
}

/// The last path segment of a URL (without query or fragment), if it is a plain file name.
pub fn url_file_name(url: &str) -> Option<&str> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .or_else(|| url.strip_prefix("file:"))?;
    let path = rest.split(['?', '#']).next()?;
    let name = path.rsplit('/').next()?;
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b));
    ok.then_some(name)
}

pub(super) fn is_archive_member(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1024
        && !s.starts_with('/')
        && !s.starts_with('-')
        && !s.ends_with('/')
        && !s.chars().any(|c| c.is_control())
        && s.split('/').all(|part| !part.is_empty() && part != "..")
}

pub(super) fn is_image_path(s: &str) -> bool {
    s.starts_with('/')
        && s.len() > 1
        && s.len() <= 1024
        && !s.ends_with('/')
        && !s.chars().any(|c| c.is_control())
        && s[1..]
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

pub(super) fn is_unit_name(s: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        ".service",
        ".socket",
        ".timer",
        ".target",
        ".path",
        ".mount",
        ".automount",
        ".swap",
        ".slice",
        ".scope",
    ];
    s.len() <= 255
        && SUFFIXES
            .iter()
            .any(|suf| s.len() > suf.len() && s.ends_with(suf))
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":-_.@\\".contains(&c))
}
