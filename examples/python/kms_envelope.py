#!/usr/bin/env python3
"""Envelope encryption of a file with a data key from the key management service, in Python.

The service is called over gRPC with mutual TLS (grpcio); the stubs are generated from
proto/kms/v1/kms.proto when the script starts (grpcio-tools), so nothing generated is kept in the
repository and the proto stays the one contract. The file is encrypted locally with AES-256-GCM
(the `cryptography` package); only the wrapped data key and the encryption context are stored
beside it, as the service's own `kmsctl encrypt` does (this script's format is simpler: a JSON
header line, then the ciphertext).

    pip install grpcio grpcio-tools cryptography
    python3 kms_envelope.py encrypt --key alias/app --context app=hr --in report.pdf --out report.pdf.enc
    python3 kms_envelope.py decrypt --in report.pdf.enc --out report.pdf

Endpoint and certificates default to `cargo xtask dev`'s: 127.0.0.1:7400 and .kms-dev/pki.
"""

import argparse
import base64
import importlib
import json
import os
import sys
import tempfile

import grpc
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from grpc_tools import protoc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stubs():
    """Compiles kms.proto into a temporary directory and imports the messages and the stubs."""
    out = tempfile.mkdtemp(prefix="kms-proto-")
    proto_root = os.path.join(REPO, "proto")
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    status = protoc.main(
        ["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", "kms/v1/kms.proto"]
    )
    if status != 0:
        sys.exit(f"compiling kms.proto failed ({status})")
    sys.path.insert(0, out)
    return importlib.import_module("kms.v1.kms_pb2"), importlib.import_module("kms.v1.kms_pb2_grpc")


def channel(endpoint, pki):
    """A mutual-TLS channel: the customer's CA, and the workload's certificate and key."""
    read = lambda name: open(os.path.join(pki, name), "rb").read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"), private_key=read("workload.key"), certificate_chain=read("workload.pem")
    )
    return grpc.secure_channel(endpoint, credentials)


def context_arg(pairs):
    context = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            sys.exit(f"--context {pair!r}: expected KEY=VALUE")
        context[key] = value
    return context


def encrypt(pb, kms, args):
    context = context_arg(args.context)
    answer = kms.GenerateDataKey(
        pb.GenerateDataKeyRequest(key_id=args.key, key_spec=pb.DataKeySpec.Value("AES_256"), encryption_context=context)
    )
    data_key = bytearray(answer.plaintext)
    nonce = os.urandom(12)
    plaintext = open(args.input, "rb").read()
    # The header is bound to the ciphertext as associated data: a changed context or key fails.
    header = json.dumps(
        {
            "format": "kms-python-envelope-v1",
            "wrapped_key": base64.b64encode(answer.ciphertext_blob).decode(),
            "encryption_context": context,
            "nonce": base64.b64encode(nonce).decode(),
        },
        sort_keys=True,
    ).encode()
    ciphertext = AESGCM(bytes(data_key)).encrypt(nonce, plaintext, header)
    # Forget the data key as far as Python lets us: the service keeps only its wrapped form.
    data_key[:] = bytes(len(data_key))
    with open(args.output, "wb") as out:
        out.write(header + b"\n" + ciphertext)
    print(f"encrypted {len(plaintext)} bytes under {answer.key_id} version {answer.key_version}")


def decrypt(pb, kms, args):
    raw = open(args.input, "rb").read()
    header, _, ciphertext = raw.partition(b"\n")
    fields = json.loads(header)
    if fields.get("format") != "kms-python-envelope-v1":
        sys.exit("not a kms-python-envelope-v1 file")
    answer = kms.Decrypt(
        pb.DecryptRequest(
            ciphertext_blob=base64.b64decode(fields["wrapped_key"]), encryption_context=fields["encryption_context"]
        )
    )
    data_key = bytearray(answer.plaintext)
    plaintext = AESGCM(bytes(data_key)).decrypt(base64.b64decode(fields["nonce"]), ciphertext, header)
    data_key[:] = bytes(len(data_key))
    with open(args.output, "wb") as out:
        out.write(plaintext)
    print(f"decrypted {len(plaintext)} bytes with {answer.key_id} version {answer.key_version}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["encrypt", "decrypt"])
    parser.add_argument("--endpoint", default=os.environ.get("KMS_DATA_ENDPOINT", "127.0.0.1:7400"))
    parser.add_argument("--pki", default=os.environ.get("KMS_PKI", ".kms-dev/pki"))
    parser.add_argument("--key", help="key id or alias/NAME (encrypt)")
    parser.add_argument("--context", action="append", help="KEY=VALUE of the encryption context (encrypt)")
    parser.add_argument("--in", dest="input", required=True)
    parser.add_argument("--out", dest="output", required=True)
    args = parser.parse_args()
    if args.mode == "encrypt" and not args.key:
        parser.error("encrypt needs --key")
    pb, rpc = stubs()
    kms = rpc.CryptoStub(channel(args.endpoint, args.pki))
    try:
        (encrypt if args.mode == "encrypt" else decrypt)(pb, kms, args)
    except grpc.RpcError as e:
        sys.exit(f"kms: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
