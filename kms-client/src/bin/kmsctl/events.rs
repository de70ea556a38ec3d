//! Notifications: watching events as they happen, webhook subscriptions, event severities.

use clap::Subcommand;
use kms_client::pb::key_management_client::KeyManagementClient;
use kms_client::{Error, pb};
use serde_json::{Value, json};

use crate::Context;
use crate::admin::admin_channel;
use crate::output::local_time;

#[derive(Subcommand)]
pub(crate) enum EventsCommand {
    /// Prints events as they happen (every node's), until interrupted.
    Watch {
        /// info (the default), warning or critical.
        #[arg(long, default_value = "info")]
        min_severity: String,
        /// Only this kind (repeatable), e.g. MarkKeyCompromised.
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// Start after this audit record instead of now (to catch up).
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
}

#[derive(Subcommand)]
pub(crate) enum NotifyCommand {
    /// Sends events at and above a severity to an HTTPS webhook, signed (prints the signing
    /// secret, the only time it is shown), or to the host's syslog (one RFC 5424 message each).
    Add {
        /// An https:// webhook, or syslog:// and the host's syslog socket (syslog:///dev/log).
        url: String,
        /// info, warning (the default) or critical.
        #[arg(long, default_value = "warning")]
        min_severity: String,
    },
    /// The subscriptions, their delivery state, and every event kind's severity.
    List,
    /// Stops a subscription.
    Remove { id: String },
    /// Sets an event kind's severity (no SEVERITY: its default again).
    Severity { kind: String, severity: Option<String> },
}

fn event_json(e: &pb::Event) -> Value {
    json!({"seq": e.seq, "time": e.time, "kind": e.kind, "severity": e.severity, "principal": e.principal, "key_id": e.key_id,
           "key_version": e.key_version, "outcome": e.outcome, "detail": e.detail})
}

fn subscription_json(s: &pb::Subscription) -> Value {
    json!({"id": s.id, "url": s.url, "min_severity": s.min_severity, "cursor": s.cursor, "delivered": s.delivered,
           "failures": s.failures, "next_attempt_time": s.next_attempt_time, "last_error": s.last_error, "creation_time": s.creation_time})
}

impl EventsCommand {
    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        let EventsCommand::Watch { min_severity, kinds, after } = self;
        let mut stream = c.watch(pb::WatchRequest { min_severity, kinds, after_seq: after }).await?.into_inner();
        while let Some(e) = stream.message().await? {
            out.print(event_json(&e), || {
                let key = if e.key_id.is_empty() { String::new() } else { format!(" key {}", e.key_id) };
                format!("{} {:<8} {} by {}{key}: {}", local_time(e.time), e.severity, e.kind, e.principal, e.detail)
            });
        }
        Ok(())
    }
}

impl NotifyCommand {
    pub(crate) fn changes(&self) -> bool {
        !matches!(self, NotifyCommand::List)
    }

    pub(crate) async fn run(self, ctx: &Context) -> Result<(), Error> {
        let out = &ctx.out;
        let mut c = KeyManagementClient::new(admin_channel(&ctx.endpoint, &ctx.tls, &ctx.session, &out.dry_run).await?);
        match self {
            NotifyCommand::Add { url, min_severity } => {
                let r = c.create_subscription(pb::CreateSubscriptionRequest { url, min_severity }).await?.into_inner();
                let s = r.subscription.clone().unwrap_or_default();
                out.print(json!({"subscription": subscription_json(&s), "secret": r.secret}), || {
                    let secret = if r.secret.is_empty() { String::new() } else { format!("\nsigning secret (shown once): {}", r.secret) };
                    format!("{}: {} ({} and above){secret}", s.id, s.url, s.min_severity)
                });
            }
            NotifyCommand::List => {
                let r = c.list_subscriptions(pb::ListSubscriptionsRequest {}).await?.into_inner();
                let severities: serde_json::Map<String, Value> = r.severities.iter().map(|s| (s.kind.clone(), json!(s.severity))).collect();
                out.print(
                    json!({"subscriptions": r.subscriptions.iter().map(subscription_json).collect::<Vec<_>>(), "severities": severities}),
                    || {
                        let mut lines: Vec<String> = r
                            .subscriptions
                            .iter()
                            .map(|s| {
                                let state = if s.failures > 0 { format!("FAILING ({}× : {})", s.failures, s.last_error) } else { "ok".to_string() };
                                format!("{} {} ({} and above): {} delivered, {state}", s.id, s.url, s.min_severity, s.delivered)
                            })
                            .collect();
                        if lines.is_empty() {
                            lines.push("no subscription (kmsctl notify add URL)".into());
                        }
                        lines.extend(r.severities.iter().map(|s| format!("  {:<30} {}", s.kind, s.severity)));
                        lines.join("\n")
                    },
                );
            }
            NotifyCommand::Remove { id } => {
                c.delete_subscription(pb::DeleteSubscriptionRequest { id: id.clone() }).await?;
                out.print(json!({"removed": id}), || format!("removed {id}"));
            }
            NotifyCommand::Severity { kind, severity } => {
                c.set_event_severity(pb::SetEventSeverityRequest { kind: kind.clone(), severity: severity.clone().unwrap_or_default() }).await?;
                out.print(json!({"kind": kind, "severity": severity}), || format!("{kind}: {}", severity.as_deref().unwrap_or("its default")));
            }
        }
        Ok(())
    }
}
