//! `token-inspect ACTION MODULE TOKEN_LABEL PIN_FILE`: looks at a token from a second process,
//! logged in as the user, the way an attacker with the PIN would (TESTPLAN R8).
//!
//! * `list`: every secret key with its security attributes, as JSON.
//! * `create-orphan:KEY_ID`: creates a service-named object with no database row;
//!   `create:LABEL` an object with that label.
//! * `destroy:LABEL`: destroys an object behind the service's back.
//! * `make-unguarded-backup-key`: a backup key pair without its unwrap template, as the key
//!   ceremony made it before 2026-11-30.
//! * `attack`: for every key object of the service (key versions and its own keys), tries to
//!   read its value, to make it extractable or not sensitive, to copy it into a readable object,
//!   to wrap it with a key that is not trusted and, when the token holds the backup key pair,
//!   to wrap it under the trusted half and unwrap it readable with the other; prints what the
//!   HSM allowed, as JSON.

use anyhow::{Context, Result};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::MechanismType;
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use serde_json::{Value, json};

const FLAGS: &[(AttributeType, &str)] = &[
    (AttributeType::Token, "token"),
    (AttributeType::Private, "private"),
    (AttributeType::Sensitive, "sensitive"),
    (AttributeType::Extractable, "extractable"),
    (AttributeType::Modifiable, "modifiable"),
    (AttributeType::Encrypt, "encrypt"),
    (AttributeType::Decrypt, "decrypt"),
    (AttributeType::Wrap, "wrap"),
    (AttributeType::Unwrap, "unwrap"),
    (AttributeType::Sign, "sign"),
    (AttributeType::Verify, "verify"),
    (AttributeType::Derive, "derive"),
    (AttributeType::WrapWithTrusted, "wrap_with_trusted"),
    (AttributeType::AlwaysSensitive, "always_sensitive"),
    (AttributeType::NeverExtractable, "never_extractable"),
];

fn describe(s: &Session, h: ObjectHandle) -> Result<Value> {
    let mut types: Vec<AttributeType> = FLAGS.iter().map(|(t, _)| *t).collect();
    types.extend([AttributeType::Label, AttributeType::Id, AttributeType::AllowedMechanisms, AttributeType::ValueLen]);
    let attrs = s.get_attributes(h, &types)?;
    let mut out = serde_json::Map::new();
    for a in attrs {
        let (name, value) = match a {
            Attribute::Label(l) => ("label".to_string(), json!(String::from_utf8_lossy(&l))),
            Attribute::Id(id) => ("id".to_string(), json!(id.iter().map(|b| format!("{b:02x}")).collect::<String>())),
            Attribute::AllowedMechanisms(m) => ("allowed_mechanisms".to_string(), json!(m.iter().map(|m| m.to_string()).collect::<Vec<_>>())),
            Attribute::ValueLen(n) => ("value_len".to_string(), json!(u64::from(n))),
            other => {
                let t = other.attribute_type();
                let Some((_, name)) = FLAGS.iter().find(|(f, _)| *f == t) else { continue };
                let flag = match other {
                    Attribute::Token(b)
                    | Attribute::Private(b)
                    | Attribute::Sensitive(b)
                    | Attribute::Extractable(b)
                    | Attribute::Modifiable(b)
                    | Attribute::Encrypt(b)
                    | Attribute::Decrypt(b)
                    | Attribute::Wrap(b)
                    | Attribute::Unwrap(b)
                    | Attribute::Sign(b)
                    | Attribute::Verify(b)
                    | Attribute::Derive(b)
                    | Attribute::WrapWithTrusted(b)
                    | Attribute::AlwaysSensitive(b)
                    | Attribute::NeverExtractable(b) => b,
                    _ => continue,
                };
                (name.to_string(), json!(flag))
            }
        };
        out.insert(name, value);
    }
    Ok(Value::Object(out))
}

/// Whether `e` says the object no longer exists.
fn vanished(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<cryptoki::error::Error>(), Some(cryptoki::error::Error::Pkcs11(RvError::ObjectHandleInvalid, _)))
}

fn attack(s: &Session, h: ObjectHandle) -> Result<Value> {
    // Reading CKA_VALUE: cryptoki leaves out attributes the token refuses, so "readable" means
    // the value actually came back.
    let value_readable =
        s.get_attributes(h, &[AttributeType::Value]).map(|attrs| attrs.iter().any(|a| matches!(a, Attribute::Value(_)))).unwrap_or(false);
    let set_extractable = s.update_attributes(h, &[Attribute::Extractable(true)]).is_ok();
    let set_not_sensitive = s.update_attributes(h, &[Attribute::Sensitive(false)]).is_ok();
    let set_wrap = s.update_attributes(h, &[Attribute::Wrap(true)]).is_ok();
    let copy_readable = match s.copy_object(h, &[Attribute::Token(false), Attribute::Sensitive(false)]) {
        Ok(copy) => {
            let _ = s.destroy_object(copy);
            true
        }
        Err(_) => false,
    };
    let wrapping = s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
        ],
    )?;
    let wrapped_by_untrusted = s.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, h).is_ok();
    let _ = s.destroy_object(wrapping);
    let through_backup_key = through_backup_key(s, h)?;
    Ok(json!({
        "value_readable": value_readable,
        "set_extractable": set_extractable,
        "set_not_sensitive": set_not_sensitive,
        "set_wrap": set_wrap,
        "copy_readable": copy_readable,
        "wrapped_by_untrusted": wrapped_by_untrusted,
        "readable_through_backup_key": through_backup_key,
    }))
}

/// With the backup key pair on the token: wraps the object under the trusted public half and
/// unwraps it with the private half into a session object that is neither sensitive nor
/// extractable-only-under-trust, then reads its value. `None` when the token has no backup key.
fn through_backup_key(s: &Session, h: ObjectHandle) -> Result<Option<bool>> {
    let find = |label: &str| -> Result<Option<ObjectHandle>> { Ok(s.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?.first().copied()) };
    let (Some(wrap), Some(unwrap)) = (find("kms-backup-wrap")?, find("kms-backup-unwrap")?) else { return Ok(None) };
    let oaep = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1, PkcsOaepSource::empty()));
    let Ok(wrapped) = s.wrap_key(&oaep, wrap, h) else { return Ok(Some(false)) };
    let readable = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(false),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
    ];
    Ok(Some(match s.unwrap_key(&oaep, unwrap, &wrapped, &readable) {
        Ok(copy) => {
            let value = s.get_attributes(copy, &[AttributeType::Value]).map(|a| a.iter().any(|a| matches!(a, Attribute::Value(_)))).unwrap_or(false);
            let _ = s.destroy_object(copy);
            value
        }
        Err(_) => false,
    }))
}

/// `attack-import:LABEL`: {"readable": whether an unwrap into a readable object worked,
/// "exportable": whether an unwrap into an object extractable under any key worked, "guarded": whether an unwrap as the service makes it (sensitive, extractable only under a
/// trusted key, no wrap, unwrap or derive) worked}.
fn attack_import(s: &Session, label: &str) -> Result<Value> {
    let find = |class| -> Result<ObjectHandle> {
        s.find_objects(&[Attribute::Class(class), Attribute::Label(label.as_bytes().to_vec())])?
            .first()
            .copied()
            .context("no import key pair with that label")
    };
    let (public, private) = (find(ObjectClass::PUBLIC_KEY)?, find(ObjectClass::PRIVATE_KEY)?);
    // The attacker's copy of the public half, able to wrap, and a key of theirs to wrap.
    let mut key = Vec::new();
    for a in s.get_attributes(public, &[AttributeType::Modulus, AttributeType::PublicExponent])? {
        match a {
            Attribute::Modulus(m) => key.push(Attribute::Modulus(m)),
            Attribute::PublicExponent(e) => key.push(Attribute::PublicExponent(e)),
            _ => {}
        }
    }
    key.extend([Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::KeyType(KeyType::RSA), Attribute::Token(false), Attribute::Wrap(true)]);
    let wrapper = s.create_object(&key)?;
    let mine = s.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Token(false),
            Attribute::Extractable(true),
            Attribute::Sensitive(false),
        ],
    )?;
    let oaep = Mechanism::RsaPkcsOaep(PkcsOaepParams::new(MechanismType::SHA1, PkcsMgfType::MGF1_SHA1, PkcsOaepSource::empty()));
    let wrapped = s.wrap_key(&oaep, wrapper, mine)?;
    let aes = |more: &[Attribute]| {
        let mut t = vec![Attribute::Class(ObjectClass::SECRET_KEY), Attribute::KeyType(KeyType::AES), Attribute::Token(false)];
        t.extend_from_slice(more);
        t
    };
    let readable = match s.unwrap_key(&oaep, private, &wrapped, &aes(&[Attribute::Sensitive(false), Attribute::Extractable(true)])) {
        Ok(copy) => {
            let value = s.get_attributes(copy, &[AttributeType::Value]).map(|a| a.iter().any(|a| matches!(a, Attribute::Value(_)))).unwrap_or(false);
            let _ = s.destroy_object(copy);
            value
        }
        Err(_) => false,
    };
    // Sensitive, but extractable under any key: then wrapped under a key of the attacker's.
    let exportable = match s.unwrap_key(
        &oaep,
        private,
        &wrapped,
        &aes(&[Attribute::Sensitive(true), Attribute::Extractable(true), Attribute::WrapWithTrusted(false)]),
    ) {
        Ok(copy) => {
            let theirs = s.generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::KeyType(KeyType::AES),
                    Attribute::ValueLen(32.into()),
                    Attribute::Token(false),
                    Attribute::Wrap(true),
                ],
            )?;
            let out = s.wrap_key(&Mechanism::AesKeyWrapPad, theirs, copy).is_ok();
            let _ = s.destroy_object(theirs);
            let _ = s.destroy_object(copy);
            out
        }
        Err(_) => false,
    };
    let guarded_template = aes(&[
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]);
    let guarded = match s.unwrap_key(&oaep, private, &wrapped, &guarded_template) {
        Ok(copy) => {
            let _ = s.destroy_object(copy);
            true
        }
        Err(_) => false,
    };
    let _ = s.destroy_object(mine);
    let _ = s.destroy_object(wrapper);
    Ok(json!({"readable": readable, "exportable": exportable, "guarded": guarded}))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, action, module, label, pin_file] = args.as_slice() else {
        anyhow::bail!("usage: token-inspect list|attack MODULE TOKEN_LABEL PIN_FILE");
    };
    let pkcs11 = Pkcs11::new(module)?;
    pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let slot = pkcs11
        .get_slots_with_initialized_token()?
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).is_ok_and(|t| t.label() == label))
        .context("token not found")?;
    let session = pkcs11.open_rw_session(slot)?;
    let pin = std::fs::read_to_string(pin_file)?;
    session.login(UserType::User, Some(&AuthPin::from(pin.trim())))?;
    if action == "make-unguarded-backup-key" {
        // A backup key pair as `kms-server backup-key` made it before the private half carried
        // CKA_UNWRAP_TEMPLATE (the public half is not marked trusted here: that needs the SO).
        session.generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::ModulusBits(2048.into()),
                Attribute::PublicExponent(vec![1, 0, 1]),
                Attribute::Wrap(true),
                Attribute::Label(b"kms-backup-wrap".to_vec()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Unwrap(true),
                Attribute::Label(b"kms-backup-unwrap".to_vec()),
            ],
        )?;
        println!("made");
        return Ok(());
    }
    // An object as an interrupted CreateKey would leave it (named like a service key, with no
    // row in the database), or any other left behind (`kms-load`'s throwaway key).
    let created = action.strip_prefix("create-orphan:").map(|key_id| format!("kms:{key_id}:1")).or(action.strip_prefix("create:").map(String::from));
    if let Some(label) = created {
        session.generate_key(
            &Mechanism::AesKeyGen,
            &[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(32.into()),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(label.into_bytes()),
            ],
        )?;
        println!("created");
        return Ok(());
    }
    if let Some(file) = action.strip_prefix("import-aes:") {
        // Known-answer keys (TESTPLAN R16): each line `LABEL HEX`, imported as an AES token key
        // for AES-GCM, so that the service's own HSM code can be held to published vectors.
        let lines = std::fs::read_to_string(file)?;
        for line in lines.lines().filter(|l| !l.is_empty()) {
            let (label, hex) = line.split_once(' ').context("LABEL HEX")?;
            let value = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16)).collect::<Result<Vec<u8>, _>>()?;
            session.create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Value(value),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Encrypt(true),
                Attribute::Decrypt(true),
                Attribute::Label(label.as_bytes().to_vec()),
            ])?;
        }
        println!("imported");
        return Ok(());
    }
    if action == "labels" {
        // Every object's label, of every class (key pairs included).
        let mut labels = Vec::new();
        for h in session.find_objects(&[])? {
            for a in session.get_attributes(h, &[AttributeType::Label])? {
                if let Attribute::Label(bytes) = a {
                    labels.push(String::from_utf8_lossy(&bytes).into_owned());
                }
            }
        }
        println!("{}", json!(labels));
        return Ok(());
    }
    if let Some(label) = action.strip_prefix("attack-import:") {
        // The attack on an import key pair: material wrapped (as anyone can, with its public
        // half) and unwrapped with its private half into a readable object. Its
        // CKA_UNWRAP_TEMPLATE must make the HSM refuse, and allow the unwrap the service makes.
        println!("{}", attack_import(&session, label)?);
        return Ok(());
    }
    if let Some(label) = action.strip_prefix("destroy:") {
        // An object lost behind the service's back (a power cut, an HSM restored from an older
        // state).
        let found = session.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?;
        let handle = found.first().context("no object with that label")?;
        session.destroy_object(*handle)?;
        println!("destroyed");
        return Ok(());
    }
    let objects = session.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)])?;
    let mut out = Vec::new();
    for h in objects {
        // The service may destroy an object between the search and the read (its destruction
        // sweep runs while tests poll the token): a vanished object is simply not listed.
        let mut v = match describe(&session, h) {
            Err(e) if vanished(&e) => continue,
            other => other?,
        };
        if action == "attack" {
            // The key versions (`kms:…`) and the service's own keys (`kms-…`).
            if !v["label"].as_str().unwrap_or_default().starts_with("kms") {
                continue;
            }
            v["attack"] = attack(&session, h)?;
        }
        out.push(v);
    }
    println!("{}", Value::Array(out));
    Ok(())
}
