//! The two PKCS#11 calls cryptoki cannot make, both about an attribute whose value is itself a
//! template (`CKA_UNWRAP_TEMPLATE`), which cryptoki's `Attribute` has no variant for: making the
//! backup key pair with it, and asking whether a key has it. They go through cryptoki's own raw
//! bindings, on a session cryptoki opened, in the module the process has already loaded and
//! initialised (loading it again returns the same library), so the session handle is valid.

#![allow(unsafe_code)]

use std::path::Path;

use cryptoki::context::Function;
use cryptoki::error::{Error as CkError, Rv};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys as sys;

/// Generates an RSA key pair (`CKM_RSA_PKCS_KEY_PAIR_GEN`) whose private half carries
/// `CKA_UNWRAP_TEMPLATE = unwrap_template`: the HSM then refuses to unwrap any key whose
/// template lacks one of those attributes with the same value. Returns the public half.
pub fn generate_rsa_pair_with_unwrap_template(
    module: &Path,
    session: &Session,
    public: &[Attribute],
    private: &[Attribute],
    unwrap_template: &[Attribute],
) -> Result<ObjectHandle, CkError> {
    // Each CK_ATTRIBUTE points into the `Attribute` it was made from: these vectors and the
    // caller's templates outlive the call.
    let mut forced: Vec<sys::CK_ATTRIBUTE> = unwrap_template.iter().map(Into::into).collect();
    let mut private: Vec<sys::CK_ATTRIBUTE> = private.iter().map(Into::into).collect();
    private.push(sys::CK_ATTRIBUTE {
        type_: sys::CKA_UNWRAP_TEMPLATE,
        pValue: forced.as_mut_ptr().cast(),
        ulValueLen: sys::CK_ULONG::try_from(forced.len() * size_of::<sys::CK_ATTRIBUTE>())?,
    });
    let mut public: Vec<sys::CK_ATTRIBUTE> = public.iter().map(Into::into).collect();
    let mut mechanism = sys::CK_MECHANISM { mechanism: sys::CKM_RSA_PKCS_KEY_PAIR_GEN, pParameter: std::ptr::null_mut(), ulParameterLen: 0 };
    let (mut public_handle, mut private_handle) = (0, 0);
    // SAFETY: see `function_list`; every pointer passed points into a live vector of the length
    // given, and the callee writes only the two handles.
    unsafe {
        let (_library, list) = function_list(module)?;
        let generate = list.C_GenerateKeyPair.ok_or(CkError::NullFunctionPointer)?;
        Rv::from(generate(
            session.handle(),
            &mut mechanism,
            public.as_mut_ptr(),
            sys::CK_ULONG::try_from(public.len())?,
            private.as_mut_ptr(),
            sys::CK_ULONG::try_from(private.len())?,
            &mut public_handle,
            &mut private_handle,
        ))
        .into_result(Function::GenerateKeyPair)?;
        Ok(ObjectHandle::new_from_raw(public_handle))
    }
}

/// Whether `key` carries a non-empty `CKA_UNWRAP_TEMPLATE` (a backup key pair made before it
/// was set has none, or an empty one).
pub fn has_unwrap_template(module: &Path, session: &Session, key: ObjectHandle) -> Result<bool, CkError> {
    let mut query = [sys::CK_ATTRIBUTE { type_: sys::CKA_UNWRAP_TEMPLATE, pValue: std::ptr::null_mut(), ulValueLen: 0 }];
    // SAFETY: see `function_list`; with a null `pValue` the callee only writes the attribute's
    // length into the one-element array passed.
    let rv = unsafe {
        let (_library, list) = function_list(module)?;
        let get = list.C_GetAttributeValue.ok_or(CkError::NullFunctionPointer)?;
        get(session.handle(), key.handle(), query.as_mut_ptr(), 1)
    };
    if rv == sys::CKR_ATTRIBUTE_TYPE_INVALID {
        return Ok(false);
    }
    Rv::from(rv).into_result(Function::GetAttributeValue)?;
    Ok(query[0].ulValueLen != sys::CK_UNAVAILABLE_INFORMATION && query[0].ulValueLen > 0)
}

/// The module's function list, with the library handle that keeps it valid.
///
/// # Safety
/// The module must be a PKCS#11 library that this process has already initialised through
/// cryptoki; the list must not be used after the returned library is dropped.
unsafe fn function_list(module: &Path) -> Result<(sys::Pkcs11, sys::CK_FUNCTION_LIST), CkError> {
    // SAFETY: loading an already loaded library only takes another reference to it; the
    // pointer C_GetFunctionList returns is checked for null and read while the library is held.
    unsafe {
        let library = sys::Pkcs11::new(module).map_err(CkError::LibraryLoading)?;
        let mut list: *mut sys::CK_FUNCTION_LIST = std::ptr::null_mut();
        Rv::from(library.C_GetFunctionList(&mut list)).into_result(Function::GetFunctionList)?;
        let list = *list.as_ref().ok_or(CkError::NullFunctionPointer)?;
        Ok((library, list))
    }
}
