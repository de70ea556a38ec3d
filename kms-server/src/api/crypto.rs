//! `kms.v1.Crypto`, the data plane.

use kms_proto::v1 as pb;
use kms_proto::v1::crypto_server::Crypto;
use tonic::{Request, Response, Status};

use super::{Audit, Facts, Shared, context, key_ref, optional_key_ref, workload};
use crate::domain::blob::Blob;
use crate::domain::blob::MAX_BLOB;
use crate::domain::policy::Operation;
use crate::error::Error;
use crate::service::RandomDraw;

/// The data plane's gRPC service.
#[derive(Debug, Clone)]
pub struct CryptoService(pub Shared);

/// Data key sizes: 16 (AES-128) or 32 (AES-256) bytes, as AWS KMS's `KeySpec` offers.
fn data_key_len(spec: i32, number_of_bytes: u32) -> Result<usize, Error> {
    let spec = pb::DataKeySpec::try_from(spec).map_err(|_| Error::invalid("key_spec", "is not a known DataKeySpec"))?;
    match (spec, number_of_bytes) {
        (pb::DataKeySpec::Unspecified, 0) => Err(Error::invalid("key_spec", "or number_of_bytes is required")),
        (pb::DataKeySpec::Unspecified, 16 | 32) => Ok(number_of_bytes as usize),
        (pb::DataKeySpec::Unspecified, n) => Err(Error::invalid("number_of_bytes", format!("is {n}; it must be 16 or 32"))),
        (_, n) if n != 0 => Err(Error::invalid("number_of_bytes", "must not be set together with key_spec")),
        (pb::DataKeySpec::Aes256, _) => Ok(32),
        (pb::DataKeySpec::Aes128, _) => Ok(16),
    }
}

fn blob_field(field: &'static str, blob: &[u8]) -> Result<(), Error> {
    if blob.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if blob.len() > MAX_BLOB {
        return Err(Error::invalid(field, format!("is {} bytes; at most {MAX_BLOB} are allowed", blob.len())));
    }
    Ok(())
}

/// Caller-context limits: enough for a user, a reason and a few tags, small enough to keep
/// audit records small.
const MAX_CALLER_FIELD: usize = 256;
const MAX_CALLER_ATTRIBUTES: usize = 8;
const MAX_CALLER_BYTES: usize = 2048;

/// Validates the optional caller context and renders it as the JSON the audit records.
fn caller_context(c: Option<pb::CallerContext>) -> Result<Option<String>, Error> {
    let Some(c) = c else { return Ok(None) };
    let fields = [c.user.as_str(), c.reason.as_str()].into_iter().chain(c.attributes.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]));
    let mut total = 0;
    for f in fields {
        if f.len() > MAX_CALLER_FIELD || f.chars().any(char::is_control) {
            return Err(Error::invalid("caller_context", format!("fields must be at most {MAX_CALLER_FIELD} bytes without control characters")));
        }
        total += f.len();
    }
    if c.attributes.len() > MAX_CALLER_ATTRIBUTES || total > MAX_CALLER_BYTES {
        return Err(Error::invalid("caller_context", format!("at most {MAX_CALLER_ATTRIBUTES} attributes and {MAX_CALLER_BYTES} bytes")));
    }
    let attributes: std::collections::BTreeMap<_, _> = c.attributes.into_iter().collect();
    Ok(Some(serde_json::json!({"user": c.user, "reason": c.reason, "attributes": attributes}).to_string()))
}

/// The most items in one batch call: large enough that the HSM, not gRPC, sets the pace, small
/// enough that one batch holds a data worker for milliseconds (256 × ~12 µs on SoftHSM2).
const MAX_BATCH_ITEMS: usize = 256;

/// Runs `one` on every item of a batch, each with its own facts (audited as a record of its own)
/// and its own result; the batch fails as a whole only when it is empty, too large, or an item
/// carries its own caller context.
fn batch<I, O>(
    facts: &mut Facts,
    caller: &crate::service::Caller,
    items: Vec<I>,
    mut one: impl FnMut(I, &mut Facts) -> Result<O, Error>,
) -> Result<Vec<Result<O, pb::ItemError>>, Error>
where
    I: HasCallerContext,
{
    if items.is_empty() || items.len() > MAX_BATCH_ITEMS {
        return Err(Error::invalid("items", format!("has {} items; a batch has 1 to {MAX_BATCH_ITEMS}", items.len())));
    }
    if let Some(i) = items.iter().position(|item| item.has_caller_context()) {
        return Err(Error::invalid("items", format!("item {i} has its own caller_context; set it once on the batch")));
    }
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        let mut item_facts = Facts::default();
        let result = one(item, &mut item_facts);
        let (code, detail) = match &result {
            Ok(_) => (tonic::Code::Ok, std::mem::take(&mut item_facts.detail)),
            Err(e) => {
                let st = super::status(e, &caller.request_id);
                (st.code(), st.message().to_string())
            }
        };
        results.push(result.map_err(|_| pb::ItemError { code: code as i32, message: detail.clone() }));
        facts.items.push((item_facts, code, detail));
    }
    Ok(results)
}

/// Batch items whose own caller context must stay unset.
trait HasCallerContext {
    fn has_caller_context(&self) -> bool;
}

impl HasCallerContext for pb::GenerateDataKeyRequest {
    fn has_caller_context(&self) -> bool {
        self.caller_context.is_some()
    }
}

impl HasCallerContext for pb::DecryptRequest {
    fn has_caller_context(&self) -> bool {
        self.caller_context.is_some()
    }
}

/// One GenerateDataKey, alone or as an item of a batch.
fn generate_one(
    kms: &crate::service::Kms,
    caller: &crate::service::Caller,
    facts: &mut Facts,
    r: pb::GenerateDataKeyRequest,
    draw: &mut RandomDraw,
) -> Result<pb::GenerateDataKeyResponse, Error> {
    let key = key_ref("key_id", &r.key_id)?;
    facts.key_id = kms.key_id_of(&key);
    let len = data_key_len(r.key_spec, r.number_of_bytes)?;
    let ctx = data_context("encryption_context", r.encryption_context)?;
    facts.context = Some(ctx.clone());
    let proof = kms.authorize(caller, &key, Operation::GenerateDataKey, &ctx)?;
    let (enc, data_key) = kms.generate_data_key(&proof, len, &ctx, draw)?;
    facts.key_version = Some(enc.key_version);
    Ok(pb::GenerateDataKeyResponse {
        revocation_epoch: kms.revocation_epoch(),
        key_id: enc.key_id.to_string(),
        key_version: enc.key_version,
        plaintext: data_key.into_exposed_vec(),
        ciphertext_blob: enc.blob,
    })
}

/// A data-plane call's encryption context. Names beginning with `cse_` are Google Workspace
/// CSE's (`facade::cse::wire::CONTEXT_PREFIX`): no gRPC caller may use them, so that no grant on
/// the key CSE uses, whatever an officer gave, opens a data key or a Gmail user's private key
/// that Google's calls wrapped.
fn data_context(field: &'static str, pairs: std::collections::HashMap<String, String>) -> Result<crate::domain::context::EncryptionContext, Error> {
    let prefix = crate::facade::cse::wire::CONTEXT_PREFIX;
    if let Some(name) = pairs.keys().find(|name| name.starts_with(prefix)) {
        return Err(Error::invalid(field, format!("names {name:?}: names beginning with {prefix} are reserved for Google Workspace CSE")));
    }
    context(field, pairs)
}

/// One Decrypt, alone or as an item of a batch.
fn decrypt_one(
    kms: &crate::service::Kms,
    caller: &crate::service::Caller,
    facts: &mut Facts,
    r: pb::DecryptRequest,
) -> Result<pb::DecryptResponse, Error> {
    blob_field("ciphertext_blob", &r.ciphertext_blob)?;
    blob_facts(&r.ciphertext_blob, facts);
    let expected = optional_key_ref("key_id", &r.key_id)?;
    let ctx = data_context("encryption_context", r.encryption_context)?;
    facts.context = Some(ctx.clone());
    let dec = kms.decrypt(caller, &r.ciphertext_blob, &ctx, expected.as_ref())?;
    Ok(pb::DecryptResponse {
        key_id: dec.key_id.to_string(),
        key_version: dec.key_version,
        plaintext: dec.plaintext.into_exposed_vec(),
        revocation_epoch: kms.revocation_epoch(),
    })
}

/// The key and version a blob claims, for the audit record (whether or not it decrypts).
fn blob_facts(blob: &[u8], facts: &mut Facts) {
    if let Ok(parsed) = Blob::parse(blob) {
        facts.key_id = Some(parsed.header.key_id);
        facts.key_version = Some(parsed.header.version);
    }
}

/// The most random bytes one GenerateRandom call returns (the AWS KMS limit).
const MAX_RANDOM: u32 = 1024;

#[tonic::async_trait]
impl Crypto for CryptoService {
    async fn generate_data_key(&self, request: Request<pb::GenerateDataKeyRequest>) -> Result<Response<pb::GenerateDataKeyResponse>, Status> {
        let who = workload(&request);
        let mut r = request.into_inner();
        self.0
            .call("GenerateDataKey", who, Audit::EveryOutcome, move |kms, caller, facts| {
                facts.caller_context = caller_context(r.caller_context.take())?;
                generate_one(kms, caller, facts, r, &mut RandomDraw::for_data_keys(1))
            })
            .await
    }

    async fn generate_data_keys(&self, request: Request<pb::GenerateDataKeysRequest>) -> Result<Response<pb::GenerateDataKeysResponse>, Status> {
        let who = workload(&request);
        let mut r = request.into_inner();
        self.0
            .call("GenerateDataKeys", who, Audit::EveryOutcome, move |kms, caller, facts| {
                facts.caller_context = caller_context(r.caller_context.take())?;
                let items = std::mem::take(&mut r.items);
                let mut draw = RandomDraw::for_data_keys(items.len());
                let results = batch(facts, caller, items, |item, facts| generate_one(kms, caller, facts, item, &mut draw))?;
                let results = results
                    .into_iter()
                    .map(|result| pb::GenerateDataKeyResult {
                        result: Some(match result {
                            Ok(data_key) => pb::generate_data_key_result::Result::DataKey(data_key),
                            Err(error) => pb::generate_data_key_result::Result::Error(error),
                        }),
                    })
                    .collect();
                Ok(pb::GenerateDataKeysResponse { results, revocation_epoch: kms.revocation_epoch() })
            })
            .await
    }

    async fn decrypt_batch(&self, request: Request<pb::DecryptBatchRequest>) -> Result<Response<pb::DecryptBatchResponse>, Status> {
        let who = workload(&request);
        let mut r = request.into_inner();
        self.0
            .call("DecryptBatch", who, Audit::EveryOutcome, move |kms, caller, facts| {
                facts.caller_context = caller_context(r.caller_context.take())?;
                let results = batch(facts, caller, std::mem::take(&mut r.items), |item, facts| decrypt_one(kms, caller, facts, item))?;
                let results = results
                    .into_iter()
                    .map(|result| pb::DecryptResult {
                        result: Some(match result {
                            Ok(plaintext) => pb::decrypt_result::Result::Plaintext(plaintext),
                            Err(error) => pb::decrypt_result::Result::Error(error),
                        }),
                    })
                    .collect();
                Ok(pb::DecryptBatchResponse { results, revocation_epoch: kms.revocation_epoch() })
            })
            .await
    }

    async fn generate_data_key_without_plaintext(
        &self,
        request: Request<pb::GenerateDataKeyWithoutPlaintextRequest>,
    ) -> Result<Response<pb::GenerateDataKeyWithoutPlaintextResponse>, Status> {
        let who = workload(&request);
        let mut r = request.into_inner();
        self.0
            .call("GenerateDataKeyWithoutPlaintext", who, Audit::EveryOutcome, move |kms, caller, facts| {
                facts.caller_context = caller_context(r.caller_context.take())?;
                let key = key_ref("key_id", &r.key_id)?;
                facts.key_id = kms.key_id_of(&key);
                let len = data_key_len(r.key_spec, r.number_of_bytes)?;
                let ctx = data_context("encryption_context", r.encryption_context)?;
                facts.context = Some(ctx.clone());
                let proof = kms.authorize(caller, &key, Operation::GenerateDataKeyWithoutPlaintext, &ctx)?;
                let (enc, _data_key) = kms.generate_data_key(&proof, len, &ctx, &mut RandomDraw::for_data_keys(1))?;
                facts.key_version = Some(enc.key_version);
                Ok(pb::GenerateDataKeyWithoutPlaintextResponse {
                    revocation_epoch: kms.revocation_epoch(),
                    key_id: enc.key_id.to_string(),
                    key_version: enc.key_version,
                    ciphertext_blob: enc.blob,
                })
            })
            .await
    }

    async fn encrypt(&self, request: Request<pb::EncryptRequest>) -> Result<Response<pb::EncryptResponse>, Status> {
        let who = workload(&request);
        let mut r = request.into_inner();
        let plaintext = crate::secret::SecretBytes::new(std::mem::take(&mut r.plaintext));
        self.0
            .call("Encrypt", who, Audit::EveryOutcome, move |kms, caller, facts| {
                facts.caller_context = caller_context(r.caller_context.take())?;
                let key = key_ref("key_id", &r.key_id)?;
                facts.key_id = kms.key_id_of(&key);
                let ctx = data_context("encryption_context", std::mem::take(&mut r.encryption_context))?;
                facts.context = Some(ctx.clone());
                let proof = kms.authorize(caller, &key, Operation::Encrypt, &ctx)?;
                let enc = kms.encrypt(&proof, plaintext.expose_secret(), &ctx)?;
                facts.key_version = Some(enc.key_version);
                Ok(pb::EncryptResponse {
                    key_id: enc.key_id.to_string(),
                    key_version: enc.key_version,
                    ciphertext_blob: enc.blob,
                    revocation_epoch: kms.revocation_epoch(),
                })
            })
            .await
    }

    async fn decrypt(&self, request: Request<pb::DecryptRequest>) -> Result<Response<pb::DecryptResponse>, Status> {
        let who = workload(&request);
        let mut r = request.into_inner();
        self.0
            .call("Decrypt", who, Audit::EveryOutcome, move |kms, caller, facts| {
                facts.caller_context = caller_context(r.caller_context.take())?;
                decrypt_one(kms, caller, facts, r)
            })
            .await
    }

    async fn re_encrypt(&self, request: Request<pb::ReEncryptRequest>) -> Result<Response<pb::ReEncryptResponse>, Status> {
        let who = workload(&request);
        let mut r = request.into_inner();
        self.0
            .call("ReEncrypt", who, Audit::EveryOutcome, move |kms, caller, facts| {
                facts.caller_context = caller_context(r.caller_context.take())?;
                blob_field("ciphertext_blob", &r.ciphertext_blob)?;
                blob_facts(&r.ciphertext_blob, facts);
                let source = optional_key_ref("source_key_id", &r.source_key_id)?;
                let destination = key_ref("destination_key_id", &r.destination_key_id)?;
                let source_ctx = data_context("source_encryption_context", r.source_encryption_context)?;
                facts.context = Some(source_ctx.clone());
                let dest_ctx = data_context("destination_encryption_context", r.destination_encryption_context)?;
                let (dec, enc) = kms.re_encrypt(caller, &r.ciphertext_blob, &source_ctx, source.as_ref(), &destination, &dest_ctx)?;
                facts.detail = format!("to key {} version {}", enc.key_id, enc.key_version);
                Ok(pb::ReEncryptResponse {
                    revocation_epoch: kms.revocation_epoch(),
                    source_key_id: dec.key_id.to_string(),
                    source_key_version: dec.key_version,
                    key_id: enc.key_id.to_string(),
                    key_version: enc.key_version,
                    ciphertext_blob: enc.blob,
                })
            })
            .await
    }

    async fn generate_random(&self, request: Request<pb::GenerateRandomRequest>) -> Result<Response<pb::GenerateRandomResponse>, Status> {
        let who = workload(&request);
        let r = request.into_inner();
        let (n, given) = (r.number_of_bytes, r.caller_context);
        self.0
            .call("GenerateRandom", who, Audit::EveryOutcome, move |kms, caller, facts| {
                facts.caller_context = caller_context(given)?;
                if n == 0 || n > MAX_RANDOM {
                    return Err(Error::invalid("number_of_bytes", format!("is {n}; it must be 1 to {MAX_RANDOM}")));
                }
                Ok(pb::GenerateRandomResponse { plaintext: kms.generate_random(caller, n as usize)?.into_exposed_vec() })
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_key_lengths() {
        let cases: &[(i32, u32, Result<usize, &str>)] = &[
            (1, 0, Ok(32)),
            (2, 0, Ok(16)),
            (0, 16, Ok(16)),
            (0, 32, Ok(32)),
            (0, 0, Err("key_spec")),
            (0, 24, Err("number_of_bytes")),
            (1, 32, Err("number_of_bytes")),
            (9, 0, Err("key_spec")),
        ];
        for (spec, n, want) in cases {
            let got = data_key_len(*spec, *n).map_err(|e| match e {
                Error::InvalidArgument { field, .. } => field,
                _ => "other",
            });
            assert_eq!(got, *want, "spec {spec} n {n}");
        }
    }
}
