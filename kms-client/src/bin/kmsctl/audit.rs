//! The audit trail: `kmsctl audit verify`, `export`, `tail` and `list`.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::Subcommand;
use kms_client::pb::audit_log_client::AuditLogClient;
use kms_client::{Error, pb};
use serde_json::{Value, json};

use crate::Context;
use crate::admin::{Admin, admin_channel};
use crate::output::{create_private, parse_time};

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Verifies the hash chain; exits non-zero and names the first bad record if it is broken.
    Verify,
    /// Writes records as JSON lines (for a SIEM), optionally within a time window.
    Export {
        /// From this time on: YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ (UTC) or Unix seconds.
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        /// Before this time.
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        /// The file to write (standard output by default).
        #[arg(long = "out")]
        output: Option<PathBuf>,
    },
    /// Follows the trail: prints records as they are written, as JSON lines.
    Tail {
        /// Start after this sequence number (default: the current end of the trail).
        #[arg(long)]
        after: Option<u64>,
        /// Stop after this many records (default: run until interrupted).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Prints records in order.
    List {
        /// Records after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
}

impl AuditCommand {
    /// Whether the command changes the service's state (and so takes `--dry-run`): none here do.
    pub(crate) fn changes(&self) -> bool {
        false
    }

    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = AuditLogClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self {
            AuditCommand::Verify => {
                let r = c.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
                out.print(
                    json!({
                        "ok": r.ok, "records": r.records, "first_bad_index": r.first_bad_index, "problem": r.problem,
                        "checkpoints": r.checkpoints, "last_checkpoint_seq": r.last_checkpoint_seq,
                        "pruned_through_seq": r.pruned_through_seq,
                    }),
                    || {
                        if r.ok {
                            let pruned = match r.pruned_through_seq {
                                0 => String::new(),
                                n => format!("; records 1 to {n} removed by retention, anchored at their signed checkpoint"),
                            };
                            format!(
                                "audit trail ok: {} records, {} signed checkpoints (the last covers record {}){pruned}",
                                r.records, r.checkpoints, r.last_checkpoint_seq
                            )
                        } else {
                            format!("audit trail BROKEN at record {}: {}", r.first_bad_index, r.problem)
                        }
                    },
                );
                if r.ok {
                    Ok(())
                } else {
                    Err(Error::Status(tonic::Status::data_loss(format!("the audit chain is broken at record {}", r.first_bad_index))))
                }
            }
            AuditCommand::Export { since, until, output } => {
                let mut sink: Box<dyn Write> = match &output {
                    Some(path) => Box::new(BufWriter::new(create_private(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?)),
                    None => Box::new(std::io::stdout().lock()),
                };
                let written = write_records(&mut c, since.unwrap_or(0), until.unwrap_or(0), &mut sink).await?;
                if output.is_some() {
                    out.print(json!({"records": written}), || format!("exported {written} records"));
                }
                Ok(())
            }
            AuditCommand::Tail { after, count } => {
                let mut after = match after {
                    Some(seq) => seq,
                    None => c.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner().records,
                };
                let mut printed = 0u64;
                loop {
                    let r = c
                        .list_audit_records(pb::ListAuditRecordsRequest { after_seq: after, page_size: 1000, since: 0, until: 0 })
                        .await?
                        .into_inner();
                    for a in &r.records {
                        println!("{}", record_json(a));
                        after = a.seq;
                        printed += 1;
                        if count.is_some_and(|n| printed >= n) {
                            return Ok(());
                        }
                    }
                    if r.records.is_empty() {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
            }
            AuditCommand::List { after, limit } => {
                let r =
                    c.list_audit_records(pb::ListAuditRecordsRequest { after_seq: after, page_size: limit, since: 0, until: 0 }).await?.into_inner();
                let rows: Vec<Value> = r.records.iter().map(record_json).collect();
                out.print(Value::Array(rows), || {
                    r.records
                        .iter()
                        .map(|a| format!("{} {} {} {} {} {} {}", a.seq, a.time, a.principal, a.operation, a.key_id, a.outcome, a.status))
                        .collect::<Vec<_>>()
                        .join("\n")
                });
                Ok(())
            }
        }
    }
}

/// Writes the records within `since..until` (0: no bound) to `sink` as JSON lines, and flushes
/// it; returns how many were written.
pub(crate) async fn write_records(c: &mut AuditLogClient<Admin>, since: i64, until: i64, sink: &mut dyn Write) -> Result<u64, Error> {
    let io = |e: std::io::Error| Error::Config(e.to_string());
    let (mut after, mut written) = (0, 0u64);
    loop {
        let r = c.list_audit_records(pb::ListAuditRecordsRequest { after_seq: after, page_size: 1000, since, until }).await?.into_inner();
        for a in &r.records {
            writeln!(sink, "{}", record_json(a)).map_err(io)?;
            written += 1;
        }
        if r.next_after_seq == 0 {
            break;
        }
        after = r.next_after_seq;
    }
    sink.flush().map_err(io)?;
    Ok(written)
}

fn record_json(a: &pb::AuditRecord) -> Value {
    json!({
        "seq": a.seq, "time": a.time, "request_id": a.request_id, "principal": a.principal,
        "operation": a.operation, "key_id": a.key_id, "key_version": a.key_version,
        "encryption_context": a.encryption_context, "outcome": a.outcome, "status": a.status,
        "detail": a.detail, "caller_context": a.caller_context,
    })
}
