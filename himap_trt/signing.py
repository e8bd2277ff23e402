"""Signatures of export and engine directories, with OpenSSF's ``model-signing`` library (key-based).

The sha256 digests a manifest records (:mod:`himap_trt.confine`) catch a file changed or swapped
in, but anyone who can rewrite the directory can also rewrite ``manifest.json`` with recomputed
digests. A signature closes that gap for a deployment that must trust *who* made an export:

- ``himap-trt export --sign KEY.pem`` (and ``build --sign``) signs the finished directory with an
  elliptic-curve private key (PEM, unencrypted; e.g. ``openssl ecparam -name prime256v1 -genkey
  -noout -out key.pem``) before it is swapped into place, writing :data:`SIGNATURE_NAME` (a Sigstore
  bundle holding an in-toto statement of every file's sha256) inside it;
- ``run`` / ``serve --require-signature PUB.pem`` verifies the export (and, for TensorRT, the engines)
  against the public key (``openssl ec -in key.pem -pubout -out pub.pem``) before anything is read:
  a changed, added or removed file, a rewritten manifest, another key or no signature is refused in
  one line.

Everything runs offline (no Sigstore transparency log: key-based signing, model-signing's
``use_elliptic_key_signer``). Certificate and keyless (OIDC) signing are what model-signing adds
beyond this; they are not wired to flags here. ``model-signing`` is the optional extra
``himap-trt[sign]`` (installed by ``make install``).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

from himap_trt.errors import HimapError

#: The signature file written inside a signed directory (model-signing's default name).
SIGNATURE_NAME = "model.sig"
#: The largest ``model.sig`` read (bytes); a bundle lists each file's name and sha256 (~200 bytes a
#: file), so 16 MiB holds tens of thousands of files.
MAX_SIGNATURE_BYTES = 16 * 2**20
INSTALL_HINT = "install the signing extra: pip install 'himap-trt[sign]' (OpenSSF model-signing)"


def _model_signing():
    try:
        import model_signing
    except ImportError as exc:
        raise HimapError(f"signing needs OpenSSF's model-signing, which cannot be imported ({exc}); "
                         f"{INSTALL_HINT}") from None
    return model_signing


def _read_key(path: Path, flag: str, private: bool):
    """Load a PEM key with ``cryptography`` (what model-signing uses) to check it before any work."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    kind = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise HimapError(f"{flag} {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise HimapError(f"{flag} {str(path)!r} is a directory, not a PEM key file") from None
    except OSError as exc:
        raise HimapError(f"{flag} {str(path)!r} cannot be read: {exc.strerror}") from None
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except TypeError:   # "Password was not given but private key is encrypted"
        raise HimapError(f"{flag} {str(path)!r} is an encrypted private key; pass an unencrypted EC key in PEM") from None
    except (ValueError, Exception) as exc:  # noqa: BLE001 - cryptography raises several types for bad PEM
        raise HimapError(f"{flag} {str(path)!r} is not a {kind} key in PEM format ({type(exc).__name__})") from None
    expected = ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey
    if not isinstance(key, expected):
        raise HimapError(f"{flag} {str(path)!r} is a {type(key).__name__.lstrip('_')}; model-signing's key-based "
                         f"signing takes an elliptic-curve (EC, e.g. prime256v1) {kind} key")
    return key


def check_private_key(path: Path, flag: str = "--sign") -> Path:
    """Check a ``--sign`` key before the export or build starts (and that model-signing imports).

    Raises:
        HimapError: missing or unreadable file, not an unencrypted EC private key in PEM, a curve
            model-signing cannot sign with (anything but P-256, P-384, P-521), or model-signing missing.
    """
    model_signing = _model_signing()
    _read_key(path, flag, private=True)
    _library_accepts(flag, path, lambda: model_signing.signing.Config().use_elliptic_key_signer(private_key=str(path)))
    return Path(path)


def check_public_key(path: Path, flag: str = "--require-signature") -> Path:
    """Check a ``--require-signature`` key before anything is loaded.

    Raises:
        HimapError: missing or unreadable file, not an EC public key in PEM, a curve model-signing
            cannot verify with (anything but P-256, P-384, P-521), or model-signing missing.
    """
    model_signing = _model_signing()
    _read_key(path, flag, private=False)
    _library_accepts(flag, path,
                     lambda: model_signing.verifying.Config().use_elliptic_key_verifier(public_key=str(path)))
    return Path(path)


def _library_accepts(flag: str, path: Path, configure) -> None:
    """Configure model-signing's own signer or verifier with the key now, so every check it makes
    (the curves it supports: P-256, P-384, P-521; not e.g. secp256k1) runs before any model is
    loaded rather than after a whole export."""
    try:
        configure()
    except Exception as exc:  # noqa: BLE001 - the library raises ValueError and others
        raise HimapError(f"{flag} {str(path)!r} is a key model-signing cannot use: {_first_line(exc)} (it signs "
                         "with the NIST curves P-256, P-384 and P-521, e.g. `openssl ecparam -name prime256v1 "
                         "-genkey -noout -out key.pem`)") from None


def _hashing(model_signing):
    return model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False)


def sign_directory(directory: Path, private_key: Path, flag: str = "--sign") -> Path:
    """Sign every file of ``directory`` into ``directory/model.sig``.

    Args:
        directory: the finished export or engines directory (still the temporary one, so the
            signed directory is swapped in as a whole).
        private_key: unencrypted EC private key, PEM.

    Returns:
        The signature file.

    Raises:
        HimapError: a bad key (see :func:`check_private_key`) or a signing failure.
    """
    model_signing = _model_signing()
    check_private_key(private_key, flag)
    signature = Path(directory) / SIGNATURE_NAME
    try:
        config = model_signing.signing.Config().use_elliptic_key_signer(private_key=str(private_key))
        config.set_hashing_config(_hashing(model_signing))
        config.sign(str(directory), str(signature))
    except Exception as exc:  # noqa: BLE001 - the library raises several types
        raise HimapError(f"{flag}: signing {str(directory)!r} failed: {_first_line(exc)}") from None
    return signature


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def verify_directory(directory: Path, public_key: Path, *, what: str, flag: str = "--require-signature") -> None:
    """Verify ``directory/model.sig`` against ``public_key`` and every file of ``directory``.

    Args:
        directory: an export or engines directory.
        public_key: EC public key, PEM.
        what: how messages name the directory (e.g. ``--export-dir``).

    Raises:
        HimapError: in one line naming the directory (and the file, where model-signing names one):
            no signature, a signature over :data:`MAX_SIGNATURE_BYTES` or not a regular file, a
            signature by another key, a changed, added or removed file.
    """
    model_signing = _model_signing()
    check_public_key(public_key, flag)
    directory = Path(directory)
    signature = directory / SIGNATURE_NAME
    where = f"{what} {str(directory)!r}"
    if not os.path.lexists(signature):
        raise HimapError(f"{where} is not signed ({SIGNATURE_NAME} is missing) and {flag} is given; sign it with "
                         "`himap-trt export --sign KEY.pem`")
    data = _read_signature(signature, where)
    with tempfile.TemporaryDirectory(prefix="himap-trt-sig-") as scratch:
        # model-signing reads the bundle from a path: it gets this bounded copy, never the directory's file
        copy = Path(scratch) / SIGNATURE_NAME
        copy.write_bytes(data)
        try:
            config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=str(public_key))
            config.set_hashing_config(_hashing(model_signing))
            config.verify(str(directory), str(copy))
        except Exception as exc:  # noqa: BLE001 - ValueError for mismatches, others for corrupt bundles
            raise HimapError(f"{where} fails {flag} {str(public_key)!r}: {_describe_failure(exc)}") from None


def _read_signature(signature: Path, where: str) -> bytes:
    """The bytes of ``model.sig``: a regular file (not a link, FIFO or device) of at most
    :data:`MAX_SIGNATURE_BYTES`, read with that bound whatever its size says.

    Raises:
        HimapError: naming the file, over the bound or not a regular file.
    """
    too_big = HimapError(f"{where}: {SIGNATURE_NAME} is larger than {MAX_SIGNATURE_BYTES // 2**20} MiB, the most a "
                         "signature may take (a bundle of every file's sha256 takes a few hundred bytes per file); "
                         "it is not one himap-trt wrote")
    try:
        if not stat.S_ISREG(signature.lstat().st_mode):
            raise HimapError(f"{where}: {SIGNATURE_NAME} is not a regular file (a link, FIFO or device)")
        if signature.lstat().st_size > MAX_SIGNATURE_BYTES:
            raise too_big
        with open(signature, "rb") as handle:
            data = handle.read(MAX_SIGNATURE_BYTES + 1)
    except OSError as exc:
        raise HimapError(f"{where}: {SIGNATURE_NAME} cannot be read: {exc.strerror}") from None
    if len(data) > MAX_SIGNATURE_BYTES:
        raise too_big
    return data


def _describe_failure(exc: BaseException) -> str:
    """model-signing's failure, shortened to one line that names the files it names."""
    text = " ".join(str(exc).split())
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", text)
    if changed:
        return f"{', '.join(repr(n) for n in changed[:5])} changed since it was signed"
    extra = re.findall(r"Extra files found in model \\?'[^']*\\?': ([^\"'\]]+)", text)
    missing = re.findall(r"Missing files in model \\?'[^']*\\?': ([^\"'\]]+)", text)
    if extra or missing:
        parts = [f"files added since it was signed: {', '.join(extra)[:200]}"] if extra else []
        parts += [f"files removed since it was signed: {', '.join(missing)[:200]}"] if missing else []
        return "; ".join(parts)
    return f"the signature does not verify ({text[:300] or type(exc).__name__})"
