//! The host's user and group database (through NSS: `/etc/passwd`, LDAP, systemd's dynamic
//! users), for the task users the operator names and the uids the agent must not hand out.

use std::ffi::{CStr, CString};

/// A user account: its name, uid and primary gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// The account named `name`, or `None` when there is none.
pub fn user_by_name(name: &str) -> Result<Option<Account>, String> {
    let c_name = CString::new(name).map_err(|_| format!("user name {name:?} contains a NUL"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: a zeroed passwd is a valid out-parameter; getpwnam_r writes into it and into `buf`
    // (whose length we pass), and sets `found` to it or to null.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot look up user {name:?}: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    if found.is_null() {
        return Ok(None);
    }
    Ok(Some(Account {
        name: name.to_owned(),
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    }))
}

/// Whether any account has uid `uid` (a lookup that fails counts as taken: never hand out a uid
/// we could not check).
pub fn uid_has_account(uid: u32) -> bool {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: as in `user_by_name`, with getpwuid_r.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    rc != 0 || !found.is_null()
}

/// Whether any group has gid `gid` (a failed lookup counts as taken).
pub fn gid_has_group(gid: u32) -> bool {
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: a zeroed group is a valid out-parameter; getgrgid_r writes into it and into `buf`.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut found) };
    rc != 0 || !found.is_null()
}

/// The group named `name` (or given as a number), or an error naming it.
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c_name = CString::new(name).map_err(|_| format!("group name {name:?} contains a NUL"))?;
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: a zeroed group is a valid out-parameter; getgrnam_r writes into it and into `buf`.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut gr,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!("no group named {name:?} on this host"));
    }
    Ok(gr.gr_gid)
}

/// Every group `account` belongs to (its primary group first), as `initgroups` would set them.
pub fn groups_of(account: &Account) -> Result<Vec<u32>, String> {
    let c_name = CString::new(account.name.as_str())
        .map_err(|_| format!("user name {:?} contains a NUL", account.name))?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = groups.len() as libc::c_int;
        // SAFETY: getgrouplist writes at most `n` gids into `groups` and sets `n` to how many the
        // user has; -1 means the buffer was too small, and `n` then says how large it must be.
        let rc = unsafe {
            libc::getgrouplist(c_name.as_ptr(), account.gid, groups.as_mut_ptr(), &mut n)
        };
        let n = usize::try_from(n).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        if n <= groups.len() || n > 65_536 {
            return Err(format!("cannot list the groups of user {:?}", account.name));
        }
        groups.resize(n, 0);
    }
}

/// The name of the user running the agent, for messages.
pub fn agent_user() -> String {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: as in `user_by_name`, with getpwuid_r; pw_name points into `buf` when found.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc == 0 && !found.is_null() && !pw.pw_name.is_null() {
        // SAFETY: getpwuid_r succeeded, so pw_name is a NUL-terminated string inside `buf`.
        let name = unsafe { CStr::from_ptr(pw.pw_name) };
        return format!("{} (uid {uid})", name.to_string_lossy());
    }
    format!("uid {uid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_known_and_nonsense_is_not() {
        let root = user_by_name("root").unwrap().expect("every host has root");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(groups_of(&root).unwrap().contains(&0));
        assert!(uid_has_account(0));
        assert_eq!(user_by_name("no-such-user-gangway-x").unwrap(), None);
        assert!(!uid_has_account(3_999_999_123));
        assert!(gid_has_group(0) && !gid_has_group(3_999_999_123));
        assert_eq!(group_id("0").unwrap(), 0);
        assert_eq!(group_id("root").unwrap(), 0);
        assert!(group_id("no-such-group-gangway-x")
            .unwrap_err()
            .contains("no group named"));
        assert!(user_by_name("a\0b").is_err());
        assert!(agent_user().contains("uid"));
    }
}
