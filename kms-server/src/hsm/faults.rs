//! HSM fault injection for the fault-matrix test (TESTPLAN R7), compiled only with the
//! `test-hooks` feature: it sits inside `Pkcs11Hsm`, below the `Hsm` trait, so the code under
//! test is the production code path around a real PKCS#11 call.
//!
//! `KMS_TEST_HSM_FAULTS` names a file holding one line `FUNCTION FAULT`: FUNCTION is a PKCS#11
//! function name as the service reports it (`C_Encrypt`, `C_Decrypt`, `C_GenerateRandom`,
//! `C_GenerateKey`, `C_DestroyObject`, `C_FindObjects`, `C_Sign`, ...) or `*` for every call;
//! FAULT is a `CKR_` name (`CKR_DEVICE_ERROR`, ...) or `hang` (the call stalls 10 s, then goes
//! on). No file, or an empty one: no fault. The file is read on every call, so a test turns a
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
}

fn parse(text: &str) -> Option<(String, Fault)> {
    let (function, fault) = text.trim().split_once(' ')?;
    let fault = match fault.trim() {
        "hang" => Fault::Hang,
        "CKR_DEVICE_ERROR" => Fault::Fail(RvError::DeviceError),
        "CKR_SESSION_HANDLE_INVALID" => Fault::Fail(RvError::SessionHandleInvalid),
        "CKR_SESSION_CLOSED" => Fault::Fail(RvError::SessionClosed),
        "CKR_TOKEN_NOT_PRESENT" => Fault::Fail(RvError::TokenNotPresent),
        "CKR_DEVICE_REMOVED" => Fault::Fail(RvError::DeviceRemoved),
        "CKR_USER_NOT_LOGGED_IN" => Fault::Fail(RvError::UserNotLoggedIn),
        "CKR_GENERAL_ERROR" => Fault::Fail(RvError::GeneralError),
        _ => return None,
    };
    Some((function.to_string(), fault))
}

/// Fails (or stalls) the call `function` is about to make, if the fault file says so.
pub fn inject(function: &'static str) -> Result<(), Error> {
    static PATH: std::sync::OnceLock<Option<std::ffi::OsString>> = std::sync::OnceLock::new();
    let Some(path) = PATH.get_or_init(|| std::env::var_os("KMS_TEST_HSM_FAULTS")) else { return Ok(()) };
    match std::fs::read_to_string(path).ok().and_then(|text| parse(&text)) {
        Some((f, fault)) if f == "*" || f == function => match fault {
            Fault::Hang => {
                std::thread::sleep(HANG);
                Ok(())
            }
            // The service looks only at the return value, never at which function cryptoki names.
            Fault::Fail(code) => Err(Error::Pkcs11(code, Function::GetFunctionList)),
        },
        _ => Ok(()),
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
