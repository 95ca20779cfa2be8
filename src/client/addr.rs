//! Replica addresses as people type them (`host:port`, `http://` optional), normalised to URIs
//! (one address: [`normalize_addr`], shared with the worker in `gangway_proto::link`).

use gangway_proto::link::normalize_addr;

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

/// How an address is shown to people: without the scheme.
pub fn display_addr(uri: &str) -> &str {
    uri.strip_prefix("http://").unwrap_or(uri)
}
