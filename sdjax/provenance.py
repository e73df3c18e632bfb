"""Content credentials (C2PA) for the images a job writes: a manifest signed with the user's key, embedded in the PNG.

Each signed PNG carries a C2PA manifest store (a `caBX` chunk, written by c2pa-python) whose claim says:
generator "sdjax <version>" (`claim_generator_info`), a `c2pa.created` action with IPTC's digital source type
"trainedAlgorithmicMedia", and the assertion `ASSERTION` with the image's generation settings (`manifest_for`):
model hash, sampler, steps, seed, guidance, size, mode, watermark label, and the prompt and negative prompt as
text or, by default, as their SHA-256 (`prompt_mode` "hash" | "text"). The claim's hard binding hashes every
other byte of the file, so the pixels and the PNG's tEXt generation metadata (sdjax.io.save_png, kept as they
are) are covered by the signature: a changed pixel or text chunk reads back as invalid.

The key and certificate are the user's (`load_signer`, sample.py's --c2pa_key/--c2pa_cert): a PEM private key
(EC P-256/384/521 -> es256/384/512, RSA -> ps256, Ed25519 -> ed25519) and a PEM chain, signing certificate
first. The signing certificate must be a v3 one with key usage digitalSignature and an extended key usage such as
emailProtection or documentSigning, and no CA's own self-signed certificate: normally an end-entity certificate
issued by a CA (tests/test_provenance.py makes such a throwaway chain). Readers trust it when its root is in
their trust list (c2pa's, or `read`'s `trust_anchors`); otherwise its signature reads as valid but untrusted.
`load_signer` checks the files and signs a tiny test image, so every problem shows at start-up, before any
rendering. Signing is offline: no timestamp authority, so a reader checks the certificate's validity at reading
time (once it has expired, the credentials read as expired); nothing fetches remote manifests or OCSP responses.

c2pa-python is optional (`pip install c2pa-python`, or the `provenance` extra): it is imported only when a key is
given or an image is read, and its absence is one clear error then. Without a key nothing is signed and images
are written by sdjax.io.save_png alone.

Files are written atomically: a signed PNG appears under its name only when complete (`save_png` writes the
unsigned image and the signed one to `*.tmp` files first; sdjax.jobs removes `*.tmp` leftovers of a killed run).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io as _io
import os
import re
import stat
from typing import Any, Mapping

import numpy as np
from PIL import Image

from sdjax import io

INSTALL = "pip install c2pa-python"  # or: pip install 'sdjax[provenance]'
ASSERTION = "sdjax.generation"  # the label of the assertion with the generation settings
PROMPT_MODES = ("hash", "text")
SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
FORMAT = "image/png"
# Generation settings the assertion carries when the image's record has them (sdjax.jobs.record); prompts are
# added by `manifest_for` as text or hash. The model's path and input image paths stay out (they name local files).
FIELDS = ("model_hash", "sampler", "steps", "seed", "guidance_scale", "guidance_rescale", "height", "width", "mode",
          "strength", "watermark", "truncated")
PROMPTS = ("prompt", "negative_prompt")
MAX_PEM_BYTES = 1 << 20  # a key or a certificate chain is a few KiB; anything larger is not one
# Builder settings: no thumbnail (the image is the asset), and reading/signing never goes to the network.
_VERIFY = {"remote_manifest_fetch": False, "ocsp_fetch": False}
_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}, "verify": _VERIFY}


class ProvenanceError(ValueError):
  """Content credentials that cannot be made or read as asked (package missing, bad key or certificate, ...)."""


def _c2pa():
  """The c2pa module, or one error that says how to install it."""
  try:
    import c2pa
  except ImportError as e:
    raise ProvenanceError(f"signing or reading content credentials (C2PA) needs the c2pa-python package: "
                          f"{INSTALL} ({e})") from None
  return c2pa


def _name(names: Mapping[str, str] | None, setting: str) -> str:
  return (names or {}).get(setting, setting)  # as sdjax.prompts.name_of, without importing jax


# --- the user's key and certificate ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Signer:
  """How a job signs its images: the user's key (unencrypted PKCS#8 PEM), certificate chain (PEM, signing
  certificate first), the C2PA algorithm they imply, and whether the prompts go in as text or SHA-256."""
  key_path: str
  cert_path: str
  alg: str  # es256 | es384 | es512 | ps256 | ed25519
  key_pem: bytes = dataclasses.field(repr=False)
  cert_pem: bytes = dataclasses.field(repr=False)
  prompt_mode: str = "hash"

  def native(self):
    """A c2pa-python signer (a native resource: use it in a `with` block)."""
    c2pa = _c2pa()
    return c2pa.Signer.from_info(c2pa.C2paSignerInfo(self.alg.encode(), self.cert_pem, self.key_pem, None))


def _read_pem(path: str, setting: str, names: Mapping[str, str] | None) -> bytes:
  """The bytes of a small regular file, or an error naming `setting` and why it cannot be read."""
  flag = _name(names, setting)
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise ProvenanceError(f"{flag}: {path} does not exist") from None
  except OSError as e:
    raise ProvenanceError(f"{flag}: cannot read {path} ({e.strerror or e})") from None
  if stat.S_ISDIR(st.st_mode):
    raise ProvenanceError(f"{flag}: {path} is a directory, not a PEM file")
  if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
    raise ProvenanceError(f"{flag}: {path} is not a regular file")
  if st.st_size > MAX_PEM_BYTES:
    raise ProvenanceError(f"{flag}: {path} is {st.st_size} bytes, too large for a PEM key or certificate chain")
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise ProvenanceError(f"{flag}: cannot read {path} ({e.strerror or e})") from None


def _why(error: Exception, data: bytes) -> str:
  """cryptography's reason a PEM file did not load, short, and what the file holds instead when it is clear."""
  blocks = sorted({b.decode("ascii", "replace") for b in re.findall(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----", data)})
  why = str(error).split(". See https:")[0].splitlines()[0] if str(error) else type(error).__name__
  return why + (f"; it holds: {', '.join(blocks)}" if blocks else "; it has no -----BEGIN ...----- block")


def _alg_of(key) -> str | None:
  from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
  if isinstance(key, ec.EllipticCurvePrivateKey):
    return {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}.get(key.curve.name)
  if isinstance(key, rsa.RSAPrivateKey):
    return "ps256" if key.key_size >= 2048 else None
  if isinstance(key, ed25519.Ed25519PrivateKey):
    return "ed25519"
  return None


def load_signer(key_path: str | None, cert_path: str | None, prompt_mode: str = "hash",
                names: Mapping[str, str] | None = None) -> Signer | None:
  """The checked `Signer` of a private key and certificate chain (PEM files), or None when neither is given
  (images are not signed). `prompt_mode`: "hash" (the default: the manifest carries the prompts' SHA-256) or
  "text". `names`: how errors name the settings "c2pa_key", "c2pa_cert", "c2pa_prompt" (sample.py: its flags).

  Raises ProvenanceError when only one of the two is given, c2pa-python is missing, a file is missing, not a
  regular file, unreadable or no PEM key/certificate, the key is encrypted, of an unsupported type or does not
  match the first certificate, that certificate is not valid now, or a test signature fails (c2pa refuses the
  certificate: self-signed, or lacking the key usage C2PA requires)."""
  key_flag, cert_flag = _name(names, "c2pa_key"), _name(names, "c2pa_cert")
  if key_path is None and cert_path is None:
    return None
  if prompt_mode not in PROMPT_MODES:
    raise ProvenanceError(f"{_name(names, 'c2pa_prompt')}: {prompt_mode!r} is not one of {', '.join(PROMPT_MODES)}")
  if not key_path or not cert_path:
    given, missing = (key_flag, cert_flag) if key_path else (cert_flag, key_flag)
    raise ProvenanceError(f"{given} needs {missing}: signing takes a private key and its certificate chain")
  _c2pa()  # the package first: without it the files cannot be used anyway
  from cryptography import exceptions, x509
  from cryptography.hazmat.primitives import serialization

  key_data = _read_pem(key_path, "c2pa_key", names)
  cert_data = _read_pem(cert_path, "c2pa_cert", names)
  try:
    key = serialization.load_pem_private_key(key_data, password=None)
  except TypeError:
    raise ProvenanceError(f"{key_flag}: {key_path} is an encrypted private key; give an unencrypted one "
                          f"(openssl pkey -in KEY -out KEY.pem)") from None
  except (ValueError, exceptions.UnsupportedAlgorithm) as e:
    raise ProvenanceError(f"{key_flag}: {key_path} holds no PEM private key ({_why(e, key_data)})") from None
  alg = _alg_of(key)
  if alg is None:
    raise ProvenanceError(f"{key_flag}: {key_path}: a {type(key).__name__.lstrip('_')} cannot sign C2PA manifests; "
                          f"use EC P-256/P-384/P-521, RSA of 2048 bits or more, or Ed25519")
  try:
    certs = x509.load_pem_x509_certificates(cert_data)
  except ValueError as e:
    raise ProvenanceError(f"{cert_flag}: {cert_path} holds no PEM certificate ({_why(e, cert_data)})") from None
  leaf = certs[0]
  spki = serialization.PublicFormat.SubjectPublicKeyInfo
  if (leaf.public_key().public_bytes(serialization.Encoding.DER, spki)
      != key.public_key().public_bytes(serialization.Encoding.DER, spki)):
    raise ProvenanceError(f"{key_flag} {key_path} does not match the certificate {cert_path} signs with (its first, "
                          f"{leaf.subject.rfc4514_string()})")
  import datetime
  now = datetime.datetime.now(datetime.timezone.utc)
  if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
    raise ProvenanceError(f"{cert_flag}: the certificate {leaf.subject.rfc4514_string()} is valid from "
                          f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} to {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} "
                          f"UTC, not now")
  pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # c2pa reads PKCS#8 only; SEC1/PKCS#1 files are fine here
  chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
  signer = Signer(os.path.abspath(key_path), os.path.abspath(cert_path), alg, pkcs8, chain, prompt_mode)
  try:  # c2pa's own checks (certificate profile, algorithm) now, not after the first batch has rendered
    png = _io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    png.seek(0)
    _sign_stream(png, _io.BytesIO(), manifest_for({}, prompt_mode), signer)
  except ProvenanceError as e:
    raise ProvenanceError(f"{key_flag}/{cert_flag}: c2pa cannot sign with {key_path} and {cert_path}: {e}") from None
  return signer


# --- manifests and signing ---------------------------------------------------------------------------------

def prompt_hash(text: str) -> str:
  """The hex SHA-256 of a prompt's UTF-8 bytes, as the manifest records it in "hash" mode."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sdjax_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("sdjax")
  except metadata.PackageNotFoundError:
    return "unknown"


def manifest_for(record: Mapping[str, Any], prompt_mode: str = "hash", version: str | None = None,
                 title: str | None = None) -> dict:
  """The C2PA manifest definition of an image generated with `record`'s settings (sdjax.jobs.record; any
  subset of it: a grid's has only the model's): generator "sdjax <version>" (default: record["sdjax_version"],
  else the installed one), a `c2pa.created` action of digital source type `SOURCE_TYPE`, and the assertion
  `ASSERTION` with the `FIELDS` the record has, plus `prompt`/`negative_prompt` ("text") or
  `prompt_sha256`/`negative_prompt_sha256` ("hash") for those it has."""
  if prompt_mode not in PROMPT_MODES:
    raise ValueError(f"prompt_mode {prompt_mode!r} is not one of {PROMPT_MODES}")
  version = version or str(record.get("sdjax_version") or sdjax_version())
  data = {k: record[k] for k in FIELDS if k in record}
  for k in PROMPTS:
    if k in record:
      data.update({k: record[k]} if prompt_mode == "text" else {f"{k}_sha256": prompt_hash(str(record[k]))})
  agent = {"name": "sdjax", "version": version}
  manifest = {
      "claim_generator_info": [agent],
      "format": FORMAT,
      "assertions": [
          {"label": "c2pa.actions",
           "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": SOURCE_TYPE, "softwareAgent": agent}]}},
          {"label": ASSERTION, "data": data},
      ],
  }
  if title:
    manifest["title"] = title
  return manifest


def _sign_stream(source, dest, manifest: Mapping[str, Any], signer: Signer) -> None:
  """Sign the PNG read from `source` into `dest` (binary streams; dest readable and writable)."""
  c2pa = _c2pa()
  try:
    with signer.native() as native, c2pa.Context.from_dict(_SETTINGS) as context, \
        c2pa.Builder(dict(manifest), context=context) as builder:
      builder.sign(native, FORMAT, source, dest)
  except c2pa.C2paError as e:
    raise ProvenanceError(str(e)) from None


def sign_png(src: str | os.PathLike, dst: str | os.PathLike, manifest: Mapping[str, Any], signer: Signer) -> None:
  """Write `src` (a PNG) with `manifest` signed by `signer` embedded to `dst` (may be `src`: in place).
  Everything else in the file (pixels, tEXt chunks) is kept. Atomic: `dst` is replaced only by a complete
  signed file (written to `dst`.c2pa.tmp first); on failure `dst` is untouched and no temporary file is left.
  Raises ProvenanceError when c2pa cannot sign (not a PNG, c2pa missing, ...)."""
  tmp = f"{os.fspath(dst)}.c2pa.tmp"
  try:
    with open(src, "rb") as source, open(tmp, "w+b") as dest:
      try:
        _sign_stream(source, dest, manifest, signer)
      except ProvenanceError as e:
        raise ProvenanceError(f"signing {os.fspath(src)}: {e}") from None
    os.replace(tmp, dst)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_png(path: str | os.PathLike, image: np.ndarray, metadata: Mapping[str, Any] | None = None,
             signer: Signer | None = None, record: Mapping[str, Any] | None = None) -> None:
  """sdjax.io.save_png (`metadata` as tEXt chunks), with content credentials when `signer` is given: the
  manifest of `record` (default: `metadata`; see `manifest_for`) in `signer.prompt_mode`, titled with the
  file's name. The PNG appears under `path` only once signed (the unsigned one is `path`.unsigned.tmp)."""
  if signer is None:
    io.save_png(path, image, metadata)
    return
  unsigned = f"{os.fspath(path)}.unsigned.tmp"
  try:
    io.save_png(unsigned, image, metadata)
    manifest = manifest_for(metadata if record is None else record, signer.prompt_mode,
                            title=os.path.basename(os.fspath(path)))
    sign_png(unsigned, path, manifest, signer)
  finally:
    if os.path.exists(unsigned):
      os.remove(unsigned)


def throwaway_chain(folder: str, days: int = 30) -> dict[str, str]:
  """For tests and trials, never for publishing: a throwaway EC P-256 root CA and a signing certificate it
  issues, as C2PA wants one (v3 end entity, key usage digitalSignature, extended key usage emailProtection, key
  identifiers): writes key.pem (PKCS#8),
  chain.pem (leaf, then root), root.pem and root_key.pem into `folder`; returns their paths."""
  import datetime

  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

  now = datetime.datetime.now(datetime.timezone.utc)
  root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sdjax test root CA")])
  leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sdjax test signer")])
  root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name).public_key(root_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
          .sign(root_key, hashes.SHA256()))
  leaf = (x509.CertificateBuilder().subject_name(leaf_name).issuer_name(root_name).public_key(key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
          .sign(root_key, hashes.SHA256()))
  pem = serialization.Encoding.PEM
  paths = {n: os.path.join(folder, f"{n}.pem") for n in ("key", "chain", "root", "root_key")}
  for name, k in (("key", key), ("root_key", root_key)):
    with open(paths[name], "wb") as f:
      f.write(k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
  with open(paths["chain"], "wb") as f:
    f.write(leaf.public_bytes(pem) + root.public_bytes(pem))
  with open(paths["root"], "wb") as f:
    f.write(root.public_bytes(pem))
  return paths


# --- reading back ------------------------------------------------------------------------------------------

def read(path: str | os.PathLike, trust_anchors: str | bytes | None = None) -> dict | None:
  """The content credentials of the image at `path` as read and validated by c2pa's Reader, or None when it
  has none: {"claim_generator": "sdjax 0.1.0" (name and version of the first claim_generator_info),
  "generation": the `ASSERTION` data (or None), "actions": the c2pa.actions list, "signature": the
  signature_info (common_name, alg, cert_serial_number), "validation_state": "Invalid" | "Valid" (a sound
  signature; by a certificate c2pa does not trust when "failures" is ["signingCredential.untrusted"]) |
  "Trusted", "failures": [the active manifest's validation failure codes], "manifest": the active manifest}.
  `trust_anchors`: PEM root certificates to trust besides c2pa's own list (a "Trusted" state needs the signer's
  root among them). Offline: no remote manifest or OCSP fetches."""
  c2pa = _c2pa()
  settings: dict = {"verify": _VERIFY}
  if trust_anchors:
    settings["trust"] = {"user_anchors": trust_anchors.decode() if isinstance(trust_anchors, bytes) else trust_anchors}
  try:
    with c2pa.Context.from_dict(settings) as context, open(path, "rb") as f:
      reader = c2pa.Reader.try_create(FORMAT, f, None, context)
      if reader is None:
        return None
      with reader:
        manifest = reader.get_active_manifest() or {}
        state = reader.get_validation_state()
        results = reader.get_validation_results() or {}
  except c2pa.C2paError as e:
    raise ProvenanceError(f"{path}: cannot read its content credentials ({e})") from None
  assertions = {a.get("label"): a.get("data") for a in manifest.get("assertions", [])}
  info = (manifest.get("claim_generator_info") or [{}])[0]
  failures = [s.get("code") for s in (results.get("activeManifest") or {}).get("failure", [])]
  return {"claim_generator": " ".join(str(info[k]) for k in ("name", "version") if info.get(k)) or None,
          "generation": assertions.get(ASSERTION),
          "actions": (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get("actions", []),
          "signature": manifest.get("signature_info", {}),
          "validation_state": state,
          "failures": failures,
          "manifest": manifest}
