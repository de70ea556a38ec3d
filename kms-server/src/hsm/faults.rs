//! HSM fault injection for the fault-matrix test (TESTPLAN R7), compiled only with the
//! `test-hooks` feature: it sits inside `Pkcs11Hsm`, below the `Hsm` trait, so the code under
//! test is the production code path around a real PKCS#11 call.
//!
//! `KMS_TEST_HSM_FAULTS` names a file of lines `FUNCTION FAULT` (the first line naming a call
//! applies to it): FUNCTION is a PKCS#11
//! function name as the service reports it (`C_Encrypt`, `C_Decrypt`, `C_GenerateRandom`,
//! `C_GenerateKey`, `C_DestroyObject`, `C_FindObjects`, `C_Sign`, ...) or `*` for every call;
//! FAULT is a `CKR_` name (`CKR_DEVICE_ERROR`, ...), `hang` (the call stalls 10 s, then goes
//! on), or one of two real actions before the call: `logout` (`C_Logout` on the anchor: the
//! process loses its login) and `finalize` (`C_Finalize`: the library loses every session and
//! the login, as after a device failure). No file, or an empty one: no fault. The file is read on every call, so a test turns a
//! fault on and off while the server runs and the next call sees it.

use std::time::Duration;

use cryptoki::context::Function;
use cryptoki::error::{Error, RvError};

/// How long a `hang` stalls a call: past any deadline the service sets (TESTPLAN R7: 10 s).
const HANG: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Fault {
    Fail(RvError),
    Hang,
    /// A real `C_Logout` on the anchor session: the process loses its login, as when an HSM
    /// restarts, and the call fails with the HSM's own CKR_USER_NOT_LOGGED_IN.
    Logout,
    /// A real `C_Finalize` of the library: every session and the login are gone, as when the
    /// device failed, and the call fails with CKR_CRYPTOKI_NOT_INITIALIZED.
    Finalize,
}

fn parse(text: &str) -> Option<(String, Fault)> {
    let (function, fault) = text.trim().split_once(' ')?;
    let fault = match fault.trim() {
        "hang" => Fault::Hang,
        "logout" => Fault::Logout,
        "finalize" => Fault::Finalize,
        "CKR_DEVICE_ERROR" => Fault::Fail(RvError::DeviceError),
        "CKR_SESSION_HANDLE_INVALID" => Fault::Fail(RvError::SessionHandleInvalid),
        "CKR_SESSION_CLOSED" => Fault::Fail(RvError::SessionClosed),
        "CKR_TOKEN_NOT_PRESENT" => Fault::Fail(RvError::TokenNotPresent),
        "CKR_DEVICE_REMOVED" => Fault::Fail(RvError::DeviceRemoved),
        "CKR_USER_NOT_LOGGED_IN" => Fault::Fail(RvError::UserNotLoggedIn),
        "CKR_GENERAL_ERROR" => Fault::Fail(RvError::GeneralError),
        "CKR_PIN_INCORRECT" => Fault::Fail(RvError::PinIncorrect),
        _ => return None,
    };
    Some((function.to_string(), fault))
}

fn current(function: &str) -> Option<Fault> {
    static PATH: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
    let path = PATH.get_or_init(|| std::env::var_os("KMS_TEST_HSM_FAULTS")).as_ref()?;
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().filter_map(parse).find(|(f, _)| f == "*" || f == function).map(|(_, fault)| fault)
}

/// Fails (or stalls) the call `function` is about to make, if the fault file says so.
pub fn inject(function: &'static str) -> Result<(), Error> {
    match current(function) {
        Some(Fault::Hang) => {
            std::thread::sleep(HANG);
            Ok(())
        }
        // The service looks only at the return value, never at which function cryptoki names.
        Some(Fault::Fail(code)) => Err(Error::Pkcs11(code, Function::GetFunctionList)),
        Some(Fault::Logout | Fault::Finalize) | None => Ok(()),
    }
}

/// As `inject`, and also performs the real actions (`logout`, `finalize`) on the library and the
/// anchor session, after which the call itself fails as the HSM makes it fail.
pub fn inject_into(
    function: &'static str,
    ctx: &cryptoki::context::Pkcs11,
    anchor: &std::sync::Mutex<Option<cryptoki::session::Session>>,
) -> Result<(), Error> {
    match current(function) {
        Some(Fault::Logout) => {
            if let Some(anchor) = anchor.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                let _ = anchor.logout();
            }
            Ok(())
        }
        Some(Fault::Finalize) => {
            let _ = ctx.clone().finalize();
            Ok(())
        }
        _ => inject(function),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_lines() {
        assert_eq!(parse("C_Encrypt CKR_DEVICE_ERROR\n"), Some(("C_Encrypt".into(), Fault::Fail(RvError::DeviceError))));
        assert_eq!(parse("* hang"), Some(("*".into(), Fault::Hang)));
        assert_eq!(parse("C_Encrypt CKR_NOPE"), None);
        assert_eq!(parse(""), None);
    }
}
