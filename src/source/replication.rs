//! Replication-mode commands that manage logical replication slots on the source:
//! `CREATE_REPLICATION_SLOT ... LOGICAL` (optionally exporting a snapshot) and
//! `DROP_REPLICATION_SLOT`. They need a connection made with
//! [`crate::source::ConnectOptions::replication`].
//!
//! The command text is built by pure functions, unit-tested for each server syntax: slot
//! names are validated as PostgreSQL's `ReplicationSlotValidateName` does and sent bare, so
//! they need no quoting rules; plugin names are validated and double-quoted, as
//! `pg_recvlogical` sends them.

use crate::source::connection::{Budget, Connection};
use crate::source::error::SourceError;
use crate::source::lsn::Lsn;

/// Longest slot or plugin name, in bytes (`NAMEDATALEN - 1`).
const MAX_NAME_BYTES: usize = 63;

/// What `CREATE_REPLICATION_SLOT` reports for a new logical slot.
///
/// The exported snapshot (`snapshot_name`) lives only while the connection that created the
/// slot stays open and idle: any later command on that connection, even `IDENTIFY_SYSTEM`,
/// or closing it, ends the snapshot. Import it first, from other connections, with
/// `BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '<name>'`; a transaction
/// that imported it keeps seeing that snapshot after the exporter moves on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot's name, as created.
    pub slot_name: String,
    /// The WAL position from which the slot's changes start: the exported snapshot shows
    /// exactly the data committed before it.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, when one was asked for.
    pub snapshot_name: Option<String>,
    /// The output plugin the slot decodes with.
    pub output_plugin: String,
}

impl Connection {
    /// CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL plugin, exporting a snapshot when asked
    /// (PostgreSQL 15+: `(SNAPSHOT 'export')` / `(SNAPSHOT 'nothing')`; 10-14: `EXPORT_SNAPSHOT` /
    /// `NOEXPORT_SNAPSHOT`; pick by server_version_num). The slot name is validated
    /// ([a-z0-9_], at most 63 bytes) rather than quoted.
    ///
    /// The server waits for every transaction running on the source to finish before the
    /// slot is consistent, which can take minutes (or forever, behind an idle-in-transaction
    /// session). This call therefore ignores the I/O timeout: it waits without a deadline,
    /// still running the interrupt check at least every 100 ms, which is the only way to stop
    /// it early (leaving the connection broken). A temporary slot is dropped when this
    /// connection closes. See [`CreatedSlot`] for how long an exported snapshot lives.
    pub fn create_logical_slot(
        &mut self,
        name: &str,
        plugin: &str,
        temporary: bool,
        export_snapshot: bool,
    ) -> Result<CreatedSlot, SourceError> {
        let version = self.replication_server_version("CREATE_REPLICATION_SLOT")?;
        let command = create_slot_command(name, plugin, temporary, export_snapshot, version)?;
        let (rows, _) = self.run(&command, true, Budget::unbounded("replication command"))?;
        let row = rows.first().ok_or_else(|| {
            SourceError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let text = |column: &str| -> Result<String, SourceError> {
            row.try_get(column)?.map(str::to_owned).ok_or_else(|| {
                SourceError::Protocol(format!("CREATE_REPLICATION_SLOT returned a null {column}"))
            })
        };
        let snapshot_name = row.try_get("snapshot_name")?.map(str::to_owned);
        if export_snapshot && snapshot_name.is_none() {
            return Err(SourceError::Protocol(
                "CREATE_REPLICATION_SLOT exported no snapshot".into(),
            ));
        }
        Ok(CreatedSlot {
            slot_name: text("slot_name")?,
            consistent_point: row.parse("consistent_point")?,
            snapshot_name,
            output_plugin: text("output_plugin")?,
        })
    }

    /// DROP_REPLICATION_SLOT name [WAIT]
    ///
    /// Without `wait`, a slot in use by another connection is an error (`55006`); with it,
    /// the server waits until the slot is free, without a deadline (the interrupt check still
    /// runs at least every 100 ms).
    pub fn drop_replication_slot(&mut self, name: &str, wait: bool) -> Result<(), SourceError> {
        let version = self.replication_server_version("DROP_REPLICATION_SLOT")?;
        let command = drop_slot_command(name, wait, version)?;
        let budget = if wait {
            Budget::unbounded("replication command")
        } else {
            Budget::idle("query", self.io_timeout())
        };
        self.run(&command, false, budget).map(|_| ())
    }

    /// The server version, after checking this is a replication connection.
    pub(super) fn replication_server_version(&self, command: &str) -> Result<i32, SourceError> {
        if !self.is_replication() {
            return Err(SourceError::Unsupported(format!(
                "{command} needs a replication connection"
            )));
        }
        self.server_version_num().ok_or_else(|| {
            SourceError::Protocol("the server did not report a usable server_version".into())
        })
    }
}

/// Builds `CREATE_REPLICATION_SLOT` for a logical slot in the syntax of `server_version_num`.
pub(crate) fn create_slot_command(
    name: &str,
    plugin: &str,
    temporary: bool,
    export_snapshot: bool,
    server_version_num: i32,
) -> Result<String, SourceError> {
    validate_slot_name(name)?;
    validate_plugin_name(plugin)?;
    if server_version_num < 100_000 {
        // 9.4-9.6 had neither TEMPORARY nor a choice about the snapshot.
        return Err(SourceError::Unsupported(
            "creating a logical replication slot needs a source running PostgreSQL 10 or later"
                .into(),
        ));
    }
    let mut command = format!("CREATE_REPLICATION_SLOT {name}");
    if temporary {
        command.push_str(" TEMPORARY");
    }
    command.push_str(&format!(" LOGICAL \"{plugin}\""));
    // The option list replaced the keywords in 15; the keywords still parse there, but new
    // options only come in the list form.
    command.push_str(match (server_version_num >= 150_000, export_snapshot) {
        (true, true) => " (SNAPSHOT 'export')",
        (true, false) => " (SNAPSHOT 'nothing')",
        (false, true) => " EXPORT_SNAPSHOT",
        (false, false) => " NOEXPORT_SNAPSHOT",
    });
    Ok(command)
}

/// Builds `DROP_REPLICATION_SLOT`; `WAIT` exists since PostgreSQL 10.
pub(crate) fn drop_slot_command(
    name: &str,
    wait: bool,
    server_version_num: i32,
) -> Result<String, SourceError> {
    validate_slot_name(name)?;
    if !wait {
        return Ok(format!("DROP_REPLICATION_SLOT {name}"));
    }
    if server_version_num < 100_000 {
        return Err(SourceError::Unsupported(
            "DROP_REPLICATION_SLOT ... WAIT needs PostgreSQL 10 or later".into(),
        ));
    }
    Ok(format!("DROP_REPLICATION_SLOT {name} WAIT"))
}

/// PostgreSQL's rule for slot names (slot.c): lower-case letters, digits and underscores,
/// one to 63 bytes.
pub(super) fn validate_slot_name(name: &str) -> Result<(), SourceError> {
    let invalid = |reason| SourceError::InvalidName {
        what: "replication slot",
        name: name.chars().take(MAX_NAME_BYTES + 1).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(invalid("it is longer than 63 bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            "only lower case letters, digits and underscores are allowed",
        ));
    }
    Ok(())
}

/// Plugin names are library file names: we allow letters, digits, `_` and `-`, which need no
/// escaping inside double quotes.
fn validate_plugin_name(plugin: &str) -> Result<(), SourceError> {
    let invalid = |reason| SourceError::InvalidName {
        what: "output plugin",
        name: plugin.chars().take(MAX_NAME_BYTES + 1).collect(),
        reason,
    };
    if plugin.is_empty() {
        return Err(invalid("it is empty"));
    }
    if plugin.len() > MAX_NAME_BYTES {
        return Err(invalid("it is longer than 63 bytes"));
    }
    if !plugin
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(invalid(
            "only letters, digits, underscores and hyphens are allowed",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(name: &str, temporary: bool, export: bool, version: i32) -> String {
        match create_slot_command(name, "pgoutput", temporary, export, version) {
            Ok(c) => c,
            Err(e) => panic!("{name}: {e}"),
        }
    }

    #[test]
    fn create_syntax_by_version() {
        assert_eq!(
            create("cloudmig_1", false, true, 150020),
            "CREATE_REPLICATION_SLOT cloudmig_1 LOGICAL \"pgoutput\" (SNAPSHOT 'export')"
        );
        assert_eq!(
            create("cloudmig_1", true, false, 170000),
            "CREATE_REPLICATION_SLOT cloudmig_1 TEMPORARY LOGICAL \"pgoutput\" (SNAPSHOT 'nothing')"
        );
        assert_eq!(
            create("s", false, true, 140010),
            "CREATE_REPLICATION_SLOT s LOGICAL \"pgoutput\" EXPORT_SNAPSHOT"
        );
        assert_eq!(
            create("s", true, false, 100000),
            "CREATE_REPLICATION_SLOT s TEMPORARY LOGICAL \"pgoutput\" NOEXPORT_SNAPSHOT"
        );
        let old = create_slot_command("s", "pgoutput", false, true, 90624);
        assert!(matches!(old, Err(SourceError::Unsupported(_))), "{old:?}");
        assert_eq!(
            create_slot_command("s", "wal2json-x_Y", false, false, 150000).ok(),
            Some("CREATE_REPLICATION_SLOT s LOGICAL \"wal2json-x_Y\" (SNAPSHOT 'nothing')".into())
        );
    }

    #[test]
    fn drop_syntax() {
        assert_eq!(
            drop_slot_command("cloudmig_1", false, 90600)
                .ok()
                .as_deref(),
            Some("DROP_REPLICATION_SLOT cloudmig_1")
        );
        assert_eq!(
            drop_slot_command("cloudmig_1", true, 150000)
                .ok()
                .as_deref(),
            Some("DROP_REPLICATION_SLOT cloudmig_1 WAIT")
        );
        assert!(matches!(
            drop_slot_command("s", true, 90600),
            Err(SourceError::Unsupported(_))
        ));
    }

    #[test]
    fn names_are_validated_not_quoted() {
        let longest = "a".repeat(63);
        assert!(create_slot_command(&longest, "pgoutput", false, false, 150000).is_ok());
        for bad in [
            "",
            "Upper",
            "with space",
            "semi;colon",
            "quote'",
            "dq\"",
            "é",
            "dash-ed",
            "x\0",
            &"a".repeat(64),
        ] {
            let err = create_slot_command(bad, "pgoutput", false, false, 150000);
            assert!(
                matches!(
                    &err,
                    Err(SourceError::InvalidName {
                        what: "replication slot",
                        ..
                    })
                ),
                "{bad:?}: {err:?}"
            );
            assert!(drop_slot_command(bad, false, 150000).is_err());
            if let Err(e) = err {
                assert_eq!(e.sqlstate(), "42602");
                assert!(!e.is_fatal());
            }
        }
        for bad in ["", "pg\"output", "a b", "x'", &"p".repeat(64)] {
            let err = create_slot_command("s", bad, false, false, 150000);
            assert!(
                matches!(
                    &err,
                    Err(SourceError::InvalidName {
                        what: "output plugin",
                        ..
                    })
                ),
                "{bad:?}: {err:?}"
            );
        }
        let shown = create_slot_command(&"x".repeat(10_000), "p", false, false, 150000)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(shown.len() < 200, "{shown}");
    }
}
