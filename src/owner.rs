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
