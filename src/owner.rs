//! Rights of source-defined code: what a migrated schema can run here
//! (triggers, defaults, index expressions, CHECK and domain constraints)
//! runs as the owner of the table it belongs to, never as the superuser that
//! drives the migration, as PostgreSQL 16+ apply does by default
//! (`run_as_owner = false`, usercontext.c's SwitchToUntrustedUser).

use pgrx::pg_sys;

/// While alive, the current user is a table's owner, in a
/// security-restricted operation (no SET ROLE, no session state changes that
/// outlive it); settings that code changes are rolled back when it ends.
pub struct AsOwner {
    saved_user: pg_sys::Oid,
    saved_context: i32,
    guc_level: i32,
}

impl AsOwner {
    /// # Safety
    /// In a transaction; the guard must be dropped (or the transaction
    /// aborted, which restores the same state) before the transaction ends.
    pub unsafe fn switch(owner: pg_sys::Oid) -> Self {
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_context = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_context
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let guc_level = pg_sys::NewGUCNestLevel();
        Self {
            saved_user,
            saved_context,
            guc_level,
        }
    }
}

impl Drop for AsOwner {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // An ERROR is unwinding: aborting the transaction restores the
            // user, the security context and the settings.
            return;
        }
        // SAFETY: undoes `switch` in the same transaction.
        unsafe {
            pg_sys::AtEOXact_GUC(false, self.guc_level);
            pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context);
        }
    }
}

/// While alive, the session user and the current user are both `role`, in
/// a security-restricted operation: what pg_dump's `SET SESSION
/// AUTHORIZATION` asks for, without the way back it would leave open. A plain
/// `SET SESSION AUTHORIZATION` in a session whose login is a superuser lets
/// any code that then runs (a CHECK constraint's function, say) switch back
/// with `RESET SESSION AUTHORIZATION` or `SET ROLE`; here both are refused
/// ("cannot set parameter ... within security-restricted operation"), as in
/// the index builds and materialized view refreshes PostgreSQL itself runs
/// as a table's owner (indexcmds.c, matview.c). Settings the code changes are
/// rolled back when the guard ends.
pub struct SessionAs {
    saved_user: pg_sys::Oid,
    saved_context: i32,
    guc_level: i32,
}

impl SessionAs {
    /// # Safety
    /// In a transaction, after [`pin_session_authorization`], outside any
    /// security-restricted operation; the guard must be dropped (or the
    /// (sub)transaction aborted, which restores the same state) before the
    /// (sub)transaction it was made in ends.
    pub unsafe fn switch(role: pg_sys::Oid) -> Self {
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_context = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        let guc_level = pg_sys::NewGUCNestLevel();
        let name = pg_sys::GetUserNameFromId(role, false);
        // Through the setting, as SET SESSION AUTHORIZATION does, so that
        // leaving the nest level (or an abort) puts the session user back.
        pg_sys::set_config_option(
            c"session_authorization".as_ptr(),
            name,
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SET,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
        pg_sys::SetUserIdAndSecContext(
            role,
            saved_context
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        Self {
            saved_user,
            saved_context,
            guc_level,
        }
    }
}

impl Drop for SessionAs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // An ERROR is unwinding: the abort restores user, context and
            // settings (the user and context first, as AbortTransaction does).
            return;
        }
        // SAFETY: undoes `switch` in the same (sub)transaction, in the order
        // AbortTransaction uses: the session user is put back by the setting,
        // whose assign hook requires no security restriction in force.
        unsafe {
            pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context);
            pg_sys::AtEOXact_GUC(false, self.guc_level);
        }
    }
}

/// Makes the bootstrap superuser the session authorization's own value. A
/// background worker's session user is set without the setting
/// (InitializeSessionUserIdStandalone), which stays at its boot value; leaving
/// a [`SessionAs`] (or `RESET SESSION AUTHORIZATION`) would then restore
/// nothing and leave the session as the last owner.
///
/// # Safety
/// In a transaction of a background worker connected as the bootstrap
/// superuser.
pub unsafe fn pin_session_authorization() {
    let name = pg_sys::GetUserNameFromId(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), false);
    pg_sys::SetConfigOption(
        c"session_authorization".as_ptr(),
        name,
        pg_sys::GucContext::PGC_SUSET,
        pg_sys::GucSource::PGC_S_OVERRIDE,
    );
}

/// Whether both the session user and the current user are `role`.
pub fn identity_is(role: pg_sys::Oid) -> bool {
    // SAFETY: plain reads of the backend's identity.
    unsafe { pg_sys::GetSessionUserId() == role && pg_sys::GetUserId() == role }
}
