//! `kms.v1.Session`, on the admin listener: officer login (passphrase and TOTP) and logout.

use kms_proto::v1 as pb;
use kms_proto::v1::session_server::Session;
use tonic::{Request, Response, Status};

use super::{Audit, Shared, Who, officer};
use crate::domain::officer::{Passphrase, Role};
use crate::error::Error;

/// The session service.
#[derive(Debug, Clone)]
pub struct SessionService(pub Shared);

#[tonic::async_trait]
impl Session for SessionService {
    async fn login(&self, request: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        let mut r = request.into_inner();
        let passphrase = Passphrase::new(std::mem::take(&mut r.passphrase));
        let code = zeroize::Zeroizing::new(std::mem::take(&mut r.totp_code));
        let name = std::mem::take(&mut r.name);
        self.0
            .call("Login", Who::Anonymous, Audit::EveryOutcome, move |kms, _, facts| {
                if name.is_empty() {
                    return Err(Error::invalid("name", "is required"));
                }
                facts.principal = Some(name.clone());
                let session = kms.officers().login(&name, &passphrase, &code)?;
                facts.detail = format!("{} session until {}", session.role, session.expires_at);
                Ok(pb::LoginResponse {
                    session_token: session.token.expose_secret().to_string(),
                    expiration_time: session.expires_at,
                    role: session.role.as_str().to_string(),
                })
            })
            .await
    }

    async fn logout(&self, request: Request<pb::LogoutRequest>) -> Result<Response<pb::LogoutResponse>, Status> {
        let who = officer(&request, Role::Auditor);
        // `call` refuses (and audits) a call without a valid session before running this, so
        // the token is always there when the closure runs.
        let token = match officer(&request, Role::Auditor) {
            Who::Officer { token, .. } => token,
            _ => None,
        };
        self.0
            .call("Logout", who, Audit::EveryOutcome, move |kms, _, _| {
                let token = token.ok_or_else(|| Error::Unauthenticated { reason: "no session to end".into() })?;
                kms.officers().logout(&token)?;
                Ok(pb::LogoutResponse {})
            })
            .await
    }
}
