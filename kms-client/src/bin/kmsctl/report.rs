//! The Level 2 evidence report (Morocco's cloud framework): made and signed by the service,
//! verified by it.

use clap::Subcommand;
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::{Error, pb};
use serde_json::json;

use crate::Context;
use crate::admin::admin_channel;
use crate::output::write_private;

#[derive(Subcommand)]
pub(crate) enum ReportCommand {
    /// The DGSSI Level 2 evidence: for each requirement, the evidence drawn live from the
    /// service and its HSM, PASS, WARN or FAIL with why, signed in the HSM.
    Dgssi {
        /// md, json or html (an auditor prints the html one from a browser).
        #[arg(long, default_value = "md")]
        format: String,
        /// Where to write the report (mode 0600); standard output when not given.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Checks that a report is one this service signed, unchanged (exits 1 if not).
    Verify { file: std::path::PathBuf },
}

impl ReportCommand {
    /// Runs the command and prints its answer.
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self {
            ReportCommand::Dgssi { format, out: file } => {
                let r = c.evidence_report(pb::EvidenceReportRequest { format }).await?.into_inner();
                let summary = format!("{} pass, {} warn, {} fail", r.passed, r.warnings, r.failures);
                match file {
                    Some(path) => {
                        write_private(&path, &r.document)?;
                        out.print(
                            json!({"out": path.display().to_string(), "passed": r.passed, "warnings": r.warnings, "failures": r.failures}),
                            || format!("{}: {summary}", path.display()),
                        );
                    }
                    None => {
                        use std::io::Write;
                        let mut stdout = std::io::stdout();
                        stdout.write_all(&r.document).and_then(|()| stdout.flush()).map_err(|e| Error::Config(format!("standard output: {e}")))?;
                        eprintln!("{summary}");
                    }
                }
                Ok(())
            }
            ReportCommand::Verify { file } => {
                let document = std::fs::read(&file).map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
                let r = c.verify_evidence_report(pb::VerifyEvidenceReportRequest { document }).await?.into_inner();
                out.print(json!({"valid": r.valid, "sha256": r.sha256}), || match r.valid {
                    true => format!("{}: signed by this service's HSM, unchanged (SHA-256 {})", file.display(), r.sha256),
                    false => format!("{}: NOT as this service signed it (SHA-256 now {})", file.display(), r.sha256),
                });
                if r.valid { Ok(()) } else { Err(Error::Config(format!("{}: the signature does not match", file.display()))) }
            }
        }
    }
}
