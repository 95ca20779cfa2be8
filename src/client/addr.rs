//! Replica addresses as people type them (`host:port`, `http://` optional), normalised to URIs.

/// Parses a comma-separated list of replica addresses into `http://host:port` URIs, in order.
/// Blank entries (a trailing comma) are skipped; duplicates are kept once.
pub fn parse_addr_list(list: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for part in list.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let uri = normalize_addr(part)?;
        if !out.contains(&uri) {
            out.push(uri);
        }
    }
    if out.is_empty() {
        return Err("expected at least one replica address (host:port)".to_owned());
    }
    Ok(out)
}

/// One address to `http://host:port`. `host` may be a name, an IPv4 address or a bracketed IPv6
/// address; the port is required.
pub fn normalize_addr(addr: &str) -> Result<String, String> {
    let trimmed = addr.trim();
    let rest = match trimmed.split_once("://") {
        None => trimmed,
        Some(("http", rest)) => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "{trimmed:?}: scheme {scheme}:// is not supported (plain http:// only)"
            ))
        }
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!("{trimmed:?}: expected host:port"));
    };
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        return Err(format!("{trimmed:?}: expected host:port"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "{trimmed:?}: an IPv6 address must be bracketed, e.g. [::1]:7101"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(format!("http://{host}:{p}")),
        _ => Err(format!(
            "{trimmed:?}: port {port:?} is not a number in 1..=65535"
        )),
    }
}

/// How an address is shown to people: without the scheme.
pub fn display_addr(uri: &str) -> &str {
    uri.strip_prefix("http://").unwrap_or(uri)
}
