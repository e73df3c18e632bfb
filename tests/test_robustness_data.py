"""`python -m sdjax.data.prepare` on hostile input: every bad file is one escaped line in skipped.txt with its
reason, never an abort, a hang, a memory blow-up, a read outside the input folder or a leftover .tmp file."""
import io
import os
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from sdjax.data import prepare, records


def image(path, w=8, h=8, caption="a caption"):
  Image.new("RGB", (w, h), (200, 30, 30)).save(path)
  if caption is not None:
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
      f.write(caption)
  return path


def png_header_says(width, height):
  """A 1x1 PNG whose IHDR claims width x height (CRC fixed): a bomb's header without its gigabytes."""
  buf = io.BytesIO()
  Image.new("RGB", (1, 1)).save(buf, "PNG")
  b = bytearray(buf.getvalue())
  b[16:24] = struct.pack(">II", width, height)
  b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
  return bytes(b)


def unescape(field):
  return field.encode("latin-1", "backslashreplace").decode("unicode_escape")


def skipped(out):
  """{file name: reason} from skipped.txt, checking that every line is two escaped fields."""
  rows = {}
  with open(os.path.join(out, "skipped.txt"), encoding="utf-8", newline="") as f:
    for line in f:
      assert line.endswith("\n") and line.count("\t") == 1 and "\r" not in line, repr(line)
      path, why = line[:-1].split("\t")
      rows[os.path.basename(unescape(path))] = unescape(why)
  return rows


def run(src, out, *args, manifest=False):
  """prepare.main in-process, which must succeed: (dataset.json, {file name: reason})."""
  assert prepare.main(["--manifest" if manifest else "--input", str(src), "--output", str(out), *args]) == 0
  return records.read_meta(str(out)), skipped(str(out))


def kept(out):
  src = records.RecordSource(str(out))
  return {os.path.basename(src[i]["path"]): src[i]["caption"] for i in range(len(src))}


def test_prepare_skips_a_decompression_bomb_from_its_header_without_decoding(tmp_path, monkeypatch, recwarn):
  src = tmp_path / "src"
  src.mkdir()
  image(src / "ok.png")
  (src / "bomb.png").write_bytes(png_header_says(30000, 30000))  # 9e8 pixels: PIL's DecompressionBombError
  (src / "bomb.txt").write_text("boom")
  decoded = []
  monkeypatch.setattr(prepare, "decode_image",
                      lambda data, where: decoded.append(where) or Image.open(io.BytesIO(data)))
  meta, why = run(src, tmp_path / "out")
  assert meta["num_examples"] == 1 and why["bomb.png"].startswith("too many pixels (")
  # PIL's warning range (1e8 > Image.MAX_IMAGE_PIXELS): --max_pixels decides, and PIL's warning stays quiet.
  (src / "bomb.png").write_bytes(png_header_says(10000, 10000))
  meta, why = run(src, tmp_path / "out2", "--max_pixels", "50000000")
  assert why == {"bomb.png": "too many pixels (10000x10000 > --max_pixels 50000000)"}
  assert meta["skipped_reasons"] == {"too many pixels": 1}
  assert [os.path.basename(p) for p in decoded] == ["ok.png", "ok.png"]  # the bombs were never decoded
  assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_prepare_non_utf8_caption_sidecars(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  image(src / "j.png", caption=None)
  (src / "j.json").write_bytes(b'{"caption": "caf\xe9"}')
  image(src / "deep.png", caption=None)
  (src / "deep.json").write_text("[" * 100000 + "]" * 100000)  # RecursionError in json: still one file
  image(src / "t.png", caption=None)
  (src / "t.txt").write_bytes(b"caf\xe9 au lait\r\n")
  meta, why = run(src, tmp_path / "out")
  assert kept(tmp_path / "out") == {"t.png": "caf\ufffd au lait"}  # .txt: bad bytes replaced, as before
  assert why["j.png"].startswith(f"unreadable caption file ({src / 'j.json'}: not UTF-8:")
  assert why["deep.png"].startswith("unreadable caption file (")
  assert meta["skipped_reasons"] == {"unreadable caption file": 2}


def _as_small(real):
  def stat(*args, **kwargs):
    st = real(*args, **kwargs)
    return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid, 10, 0, 0, 0))
  return stat


def test_prepare_skips_files_over_max_file_bytes_and_bounds_reads(tmp_path, monkeypatch):
  src = tmp_path / "src"
  src.mkdir()
  image(src / "small.png")
  image(src / "big.png", caption="big")
  Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(src / "big.png")  # noise: ~12 KB
  image(src / "longcap.png", caption="x" * 5000)
  size = os.path.getsize(src / "big.png")
  limit = os.path.getsize(src / "small.png") + 100
  assert size > limit
  meta, why = run(src, tmp_path / "out", "--max_file_bytes", str(limit))
  assert meta["num_examples"] == 1
  assert why["big.png"] == f"file too large ({size} bytes > --max_file_bytes {limit})"
  assert why["longcap.png"].startswith("unreadable caption file (") and "file too large" in why["longcap.png"]
  # A file that says it is small (a growing file; /proc-like files say 0) is still read only to the limit.
  read = []
  real_read = os.read
  monkeypatch.setattr(os, "read", lambda fd, n: read.append(n) or real_read(fd, n))
  monkeypatch.setattr(os, "stat", _as_small(os.stat))
  monkeypatch.setattr(os, "fstat", _as_small(os.fstat))
  with pytest.raises(prepare.Skip, match="more than --max_file_bytes 1000"):
    prepare.read_file(str(src / "big.png"), 1000)
  assert sum(read) <= 1001


def test_prepare_skips_links_outside_the_input_unless_allowed(tmp_path):
  outside = tmp_path / "outside"
  outside.mkdir()
  image(outside / "secret.png", caption="secret caption")
  src = tmp_path / "src"
  (src / "sub").mkdir(parents=True)
  image(src / "in.png")
  image(src / "sub" / "real.png", caption=None)
  os.symlink(src / "sub" / "real.png", src / "inner.png")  # a link inside the folder is fine
  (src / "inner.txt").write_text("inner")
  os.symlink("../outside/secret.png", src / "link.png")
  (src / "link.txt").write_text("link")
  image(src / "cap.png", caption=None)
  os.symlink(outside / "secret.txt", src / "cap.txt")
  meta, why = run(src, tmp_path / "out")
  assert set(kept(tmp_path / "out")) == {"in.png", "inner.png"}
  assert why["link.png"] == (f"outside the input folder (links to {outside / 'secret.png'}; "
                             "--allow_outside_input reads it)")
  assert why["cap.png"].startswith(f"unreadable caption file ({src / 'cap.txt'}: outside the input folder")
  meta, why = run(src, tmp_path / "out2", "--allow_outside_input")
  assert kept(tmp_path / "out2") == {"in.png": "a caption", "inner.png": "inner", "link.png": "link",
                                     "cap.png": "secret caption"}
  # A manifest's rows: relative to, and inside, its folder.
  (src / "m.jsonl").write_text('{"image": "in.png", "text": "ok"}\n{"image": "../outside/secret.png", "text": "s"}\n'
                               + f'{{"image": "{outside / "secret.png"}", "text": "abs"}}\n')
  meta, why = run(src / "m.jsonl", tmp_path / "out3", manifest=True)
  assert meta["num_examples"] == 1 and meta["skipped_reasons"] == {"outside the manifest's folder": 2}
  meta, why = run(src / "m.jsonl", tmp_path / "out4", "--allow_outside_input", manifest=True)
  assert meta["num_examples"] == 3 and not why


def test_prepare_cli_never_opens_fifos_or_devices(tmp_path):
  """In a subprocess with a timeout and a memory limit: a regression fails here instead of hanging or
  swallowing the machine's memory (so /dev/zero is only ever met here, never in-process)."""
  src = tmp_path / "src"
  src.mkdir()
  image(src / "ok.png")
  os.mkfifo(src / "fifo.png")  # a FIFO with an image's name
  (src / "fifo.txt").write_text("fifo")
  os.mkfifo(src / "pipe")
  os.symlink(src / "pipe", src / "piped.png")
  (src / "piped.txt").write_text("piped")
  image(src / "fifocap.png", caption=None)
  os.symlink(src / "pipe", src / "fifocap.txt")
  os.symlink("/dev/zero", src / "zero.png")
  (src / "zero.txt").write_text("zero")
  image(src / "zerocap.png", caption=None)
  os.symlink("/dev/zero", src / "zerocap.json")
  image(src / "dircap.png", caption=None)
  (src / "dircap.txt").mkdir()
  out = tmp_path / "out"

  # At most 4 GiB of address space (set in the child: no fork of this multithreaded process).
  child = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
           "runpy.run_module('sdjax.data.prepare', run_name='__main__', alter_sys=True)")

  def cli(*args):
    r = subprocess.run([sys.executable, "-c", child, "--input", str(src), "--output", str(out), *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote 1 examples in 1 shards to {out} ("), r.stdout
    assert "skipped 6 {" in lines[0] and lines[0].endswith(f"}}, listed in {out / 'skipped.txt'}")
    return lines[0], skipped(str(out))

  # By default the links to /dev/zero are not followed: it is outside the input folder.
  summary, why = cli()
  assert why["zero.png"] == "outside the input folder (links to /dev/zero; --allow_outside_input reads it)"
  assert why["zerocap.png"].startswith(f"unreadable caption file ({src / 'zerocap.json'}: outside the input folder")
  summary, why = cli("--allow_outside_input")
  assert "'not a regular file': 3" in summary and "'unreadable caption file': 3" in summary
  assert why == {
      "fifo.png": "not a regular file (a FIFO)",
      "piped.png": "not a regular file (a FIFO)",
      "zero.png": "not a regular file (a character device)",
      "fifocap.png": f"unreadable caption file ({src / 'fifocap.txt'}: not a regular file (a FIFO))",
      "zerocap.png": f"unreadable caption file ({src / 'zerocap.json'}: not a regular file (a character device))",
      "dircap.png": f"unreadable caption file ({src / 'dircap.txt'}: not a regular file (a directory))"}


def test_prepare_skipped_txt_escapes_newlines_tabs_and_bad_bytes(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  names = ["new\nline.png", "tab\tname.png", "back\\slash.png", "ret\rurn.png", "ok.png"]
  for n in names:
    image(src / n, caption=None)
  bad = os.path.join(os.fsencode(src), b"caf\xe9.png")  # not UTF-8: str paths carry it as '\udce9'
  image(bad, caption=None)
  with open(os.path.join(os.fsencode(src), b"caf\xe9.txt"), "w") as f:  # a caption: it is kept
    f.write("latin-1 name")
  image(src / "\udce9x.png", caption=None)  # same byte, no caption: skipped
  meta, why = run(src, tmp_path / "out")
  lines = open(tmp_path / "out" / "skipped.txt", encoding="utf-8").read().split("\n")[:-1]
  assert len(lines) == meta["num_skipped"] == 6
  assert f"{src}/new\\nline.png\tno caption (no .txt or .json sidecar)" in lines
  assert f"{src}/tab\\tname.png\tno caption (no .txt or .json sidecar)" in lines
  assert f"{src}/back\\\\slash.png\tno caption (no .txt or .json sidecar)" in lines
  assert set(why) == {*names, "\udce9x.png"}  # unescape gives every name back
  assert kept(tmp_path / "out") == {"caf\\xe9.png": "latin-1 name"}  # stored path: bad bytes as \xNN


def test_prepare_leaves_no_tmp_files_after_a_run_or_an_abort(tmp_path, monkeypatch, capsys):
  src = tmp_path / "src"
  src.mkdir()
  for i in range(6):
    image(src / f"i{i}.png")
  out = tmp_path / "out"
  out.mkdir()
  for stale in ("images-00000-of-00002.array_record.tmp", "dataset.json.tmp", "skipped.txt.tmp", "mine.tmp"):
    (out / stale).write_text("left by a killed run")
  run(src, out, "--examples_per_shard", "4")
  assert sorted(p.name for p in out.glob("*.tmp")) == ["mine.tmp"]  # only its own names are cleaned
  (out / "mine.tmp").unlink()

  # Interrupted in the middle of the second shard: the first shard is complete, the second's .tmp gone.
  items = prepare.collect(str(src), None)[0]
  load = prepare.load_example

  def interrupted(path, caption, **kwargs):
    if path.endswith("i5.png"):
      raise KeyboardInterrupt
    return load(path, caption, **kwargs)

  aborted = tmp_path / "aborted"
  monkeypatch.setattr(prepare, "load_example", interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(str(aborted), items, examples_per_shard=4, progress=False)
  assert sorted(p.name for p in aborted.iterdir()) == ["images-00000-of-00002.array_record"]
  monkeypatch.setattr(prepare, "load_example", load)

  # A disk that fills up while writing dataset.json: the CLI says so in one line, exit 1, no .tmp.
  replace = os.replace

  def full(a, b):
    if str(b).endswith("dataset.json"):
      raise OSError(28, "No space left on device")
    replace(a, b)

  monkeypatch.setattr(os, "replace", full)
  capsys.readouterr()
  assert prepare.main(["--input", str(src), "--output", str(tmp_path / "full")]) == 1
  assert capsys.readouterr().err.endswith("\nerror: [Errno 28] No space left on device\n")  # after tqdm's bar
  assert not list((tmp_path / "full").glob("*.tmp")) and (tmp_path / "full" / "skipped.txt").exists()


@pytest.mark.parametrize("args, message", [
    (["--max_file_bytes", "-1"], "--max_file_bytes must be >= 1, got -1"),
    (["--max_file_bytes", "0"], "--max_file_bytes must be >= 1, got 0"),
    (["--max_pixels", "0"], "--max_pixels must be >= 1, got 0"),
    (["--max_pixels", str(prepare.MAX_PIXELS + 1)], f"--max_pixels must be at most {prepare.MAX_PIXELS} (PIL's"),
    (["--num_threads", "0"], "--num_threads must be >= 1, got 0"),
    (["--max_size", "-1"], "--max_size must be >= 0, got -1"),
    (["--examples_per_shard", "0"], "--examples_per_shard must be >= 1, got 0"),
])
def test_prepare_bad_flags_are_one_line_errors(tmp_path, capsys, args, message):
  src = tmp_path / "src"
  src.mkdir()
  image(src / "a.png")
  assert prepare.main(["--input", str(src), "--output", str(tmp_path / "out"), *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
  assert not (tmp_path / "out").exists()  # checked before anything is read or written


def test_prepare_bad_output_or_manifest_is_a_one_line_error(tmp_path, capsys):
  (tmp_path / "file").write_text("")
  (tmp_path / "m.csv").write_bytes(b"file_name,text\na.png,caf\xe9\n")
  cases = ((["--input", str(tmp_path), "--output", str(tmp_path / "file")], "exists and is not a folder"),
           (["--manifest", str(tmp_path / "m.csv"), "--output", str(tmp_path / "o")], "is not UTF-8 text"))
  for args, message in cases:
    assert prepare.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
