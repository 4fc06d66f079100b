"""Debian arm64 kernels: fetch them with the machine's own apt, cache the
vmlinuz, name them, and say which era model stands for each.

The archive URI comes from the machine's apt sources at run time (never from
this file), so the fetch goes wherever the machine's apt already goes.
Each release gets its own private package lists, so a package found there
comes from that release's suites and nothing else.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..kvm import eras
from . import RealKvmError, cache_root, last_line, need_tool

Log = Callable[[str], None]

SOURCES_FILES = ("/etc/apt/sources.list",)
SOURCES_DIR = "/etc/apt/sources.list.d"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MAX_TRIES = 12            # candidate packages tried, newest first


@dataclass(frozen=True)
class Release:
    name: str                 # what users type: 5.10, 6.1, 6.12, latest
    suites: tuple[str, ...]   # suites of the main archive
    security: str | None      # suite of the security archive, if any
    image: str                # regex over linux-image-* package names; groups = version numbers


RELEASES: dict[str, Release] = {r.name: r for r in (
    Release("5.10", ("bullseye", "bullseye-updates"), "bullseye-security",
            r"linux-image-5\.10\.0-(\d+)-arm64"),
    Release("6.1", ("bookworm", "bookworm-updates"), "bookworm-security",
            r"linux-image-6\.1\.0-(\d+)-arm64"),
    Release("6.12", ("trixie", "trixie-updates"), "trixie-security",
            r"linux-image-6\.12\.(\d+)\+deb13(?:\.(\d+))?-arm64"),
    Release("latest", ("trixie-backports",), None,
            r"linux-image-(\d+)\.(\d+)\.(\d+)\+deb13(?:\.(\d+))?-arm64"),
)}


# ---------------------------------------------------------------- eras

def parse_version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) from '6.1.192', 'v5.12.9', '5.10.0-46-arm64', '6.13-rc1'."""
    m = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", text.strip())
    if not m:
        raise ValueError(f"not a kernel version: {text!r}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def era_for_version(version_str: str) -> str:
    """The id of the era model that stands for a kernel version (the ranges
    are data of the eras themselves, oracle/kvm/eras.py)."""
    return eras.era_for_version(parse_version(version_str)).id


# ---------------------------------------------------------------- kernels users name

@dataclass(frozen=True)
class Kernel:
    name: str                 # a release name, or the path as the user gave it
    path: Path
    version: str              # upstream version (e.g. 6.1.192), "" if unknown
    release: str              # uname -r (e.g. 6.1.0-56-arm64), "" if unknown
    sha256: str = ""          # of the image file: which kernel a finding was seen on

    def mark(self) -> dict[str, str]:
        """What a finding records of the kernel it was seen on."""
        return {"name": self.name, "version": self.version, "release": self.release, "sha256": self.sha256}

    @property
    def era(self) -> str | None:
        return era_for_version(self.version) if self.version else None


def resolve(spec: str, root: Path | None = None) -> Kernel:
    """A cached release name (5.10, 6.1, 6.12, latest) or the path of an arm64 Image/vmlinuz."""
    root = root or cache_root()
    if spec in RELEASES:
        meta = _read_meta(root, spec)
        if meta is None:
            raise RealKvmError(f"kernel {spec} is not cached: run `stepfuzz kernels fetch {spec}`")
        problem = corrupt(meta)
        if problem:
            raise RealKvmError(f"kernel {spec}: {problem}: run `stepfuzz kernels fetch {spec}` to fetch it again")
        return Kernel(spec, Path(meta["path"]), meta["version"], meta["uname"], meta["sha256"])
    path = Path(spec).expanduser()
    if not path.is_file():
        names = ", ".join(RELEASES)
        raise RealKvmError(f"--kernel {spec}: no such file, and not a kernel name ({names})")
    release, version = banner_version(path)
    if not release:
        raise RealKvmError(f"--kernel {spec}: not a Linux kernel image (no 'Linux version' banner in it)")
    return Kernel(spec, path.resolve(), version, release, file_sha256(path))


HOST = "host"                 # a --kernel name: this arm64 machine's own KVM


def target(spec: str | None, root: Path | None = None, native: bool = False) -> Kernel | None:
    """What a --kernel value names: a Kernel to boot under QEMU, or None for
    this host's own KVM (`host`, the default where `native` says there is one)."""
    spec = spec or (HOST if native else None)
    if spec is None:
        raise RealKvmError("--kernel is required (5.10, 6.1, 6.12, latest or a PATH; see `stepfuzz kernels list`)")
    if spec == HOST:
        if not native:
            raise RealKvmError("--kernel host needs an arm64 machine with /dev/kvm")
        return None
    return resolve(spec, root)


def era_of(kernel: Kernel | None) -> str | None:
    """The era that stands for `kernel` (None: this host's), None if its version is unknown."""
    if kernel is not None:
        return kernel.era
    import platform
    try:
        return era_for_version(platform.release())
    except ValueError:
        return None


def banner_version(path: Path) -> tuple[str, str]:
    """(uname release, upstream version) from the 'Linux version' banner inside an image."""
    data = _image_bytes(path.read_bytes())
    m = re.search(rb"Linux version (\S+) [^\n\0]*", data)
    if not m:
        return "", ""
    release = m[1].decode(errors="replace")
    # Debian puts the upstream version after the build number: "#1 SMP Debian 6.1.192-2 (date)"
    deb = re.search(rb"#\d* [^#]*?Debian (\d+\.\d+\.\d+)", m[0])
    if deb:
        return release, deb[1].decode()
    try:
        major, minor, patch = parse_version(release)
    except ValueError:
        return release, ""
    return release, f"{major}.{minor}.{patch}"


def _image_bytes(raw: bytes) -> bytes:
    """The uncompressed kernel: plain Image, gzip (Debian's vmlinuz) or an EFI zboot wrapper."""
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            return raw
    if raw[:2] == b"MZ" and raw[4:8] == b"zimg":
        start = int.from_bytes(raw[8:12], "little")
        size = int.from_bytes(raw[12:16], "little")
        if raw[24:28] == b"gzip":
            try:
                return gzip.decompress(raw[start:start + size])
            except (OSError, EOFError, zlib.error):
                return raw
    return raw


# ---------------------------------------------------------------- the cache

def kernel_dir(root: Path, name: str) -> Path:
    return root / "kernels" / name


def _read_meta(root: Path, name: str) -> dict | None:
    """kernel.json of a cached release, its image path made absolute (it is
    kept relative to the release's directory, so a copied or moved cache
    boots its own images); None if there is none to read."""
    home = kernel_dir(root, name)
    try:
        data = json.loads((home / "kernel.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("path", "version", "uname")):
        return None
    image = home / Path(data["path"]).name          # an absolute path (older caches) is taken by its name
    if not image.is_file():
        return None
    return data | {"path": str(image)}


def corrupt(meta: dict) -> str:
    """Why a cached image cannot be trusted ('' if it can): its sha256 is not
    the one recorded when it was fetched (a truncated or swapped file)."""
    want = meta.get("sha256")
    if not isinstance(want, str):
        return "its kernel.json records no sha256"
    got = file_sha256(Path(meta["path"]))
    return "" if got == want else (f"the cached image {meta['path']} is corrupt (sha256 {got[:16]}..., "
                                   f"{want[:16]}... when fetched)")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached(root: Path | None = None) -> list[dict]:
    """Metadata of every cached kernel, in release order."""
    root = root or cache_root()
    out = []
    for name in RELEASES:
        meta = _read_meta(root, name)
        if meta:
            out.append(meta | {"era": era_for_version(meta["version"])})
    return out


# ---------------------------------------------------------------- the machine's apt sources

@dataclass(frozen=True)
class Archive:
    main: str                 # URI of the Debian archive the machine uses
    security: str | None      # URI of its security archive
    keyring: str | None


def machine_archive() -> Archive:
    """The Debian archive URIs in the machine's apt sources (one-line and deb822)."""
    entries: list[tuple[str, list[str], str | None]] = []     # (uri, suites, signed-by)
    files = [Path(p) for p in SOURCES_FILES] + sorted(Path(SOURCES_DIR).glob("*.list"))
    for f in files:
        if f.is_file():
            entries += _one_line_entries(f.read_text(errors="replace"))
    for f in sorted(Path(SOURCES_DIR).glob("*.sources")):
        entries += _deb822_entries(f.read_text(errors="replace"))
    main = security = keyring = None
    for uri, suites, signed in entries:
        for suite in suites:
            if suite.endswith("-security"):
                security = security or uri
            elif "/" not in suite and _is_debian_suite(suite) and main is None:
                main, keyring = uri, signed
    if main is None:
        raise RealKvmError("no Debian archive found in the machine's apt sources "
                           f"({', '.join(SOURCES_FILES)}, {SOURCES_DIR}/*.list, *.sources)")
    if keyring is None and Path(DEFAULT_KEYRING).is_file():
        keyring = DEFAULT_KEYRING
    return Archive(main.rstrip("/"), security.rstrip("/") if security else None, keyring)


DEBIAN_SUITES = ("buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
                 "oldoldstable", "oldstable", "stable", "testing", "unstable")


def _is_debian_suite(suite: str) -> bool:
    return suite.split("-")[0] in DEBIAN_SUITES


def _one_line_entries(text: str) -> list[tuple[str, list[str], str | None]]:
    out = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("deb "):
            continue
        signed = None
        opts = re.match(r"deb\s+\[([^\]]*)\]\s*", line)
        if opts:
            m = re.search(r"signed-by=(\S+)", opts[1])
            signed = m[1] if m else None
            rest = line[opts.end():].split()
        else:
            rest = line.split()[1:]
        if len(rest) >= 2:
            out.append((rest[0], [rest[1]], signed))
    return out


def _deb822_entries(text: str) -> list[tuple[str, list[str], str | None]]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        signed = fields.get("signed-by", "").strip()
        signed = signed if signed.startswith("/") and "\n" not in signed else None
        for uri in fields.get("uris", "").split():
            out.append((uri, fields.get("suites", "").split(), signed))
    return out


# ---------------------------------------------------------------- apt, privately

class Apt:
    """apt-get/apt-cache for arm64 over one release's suites, with private lists."""

    def __init__(self, root: Path, release: Release, archive: Archive):
        self.release = release
        self.dir = root / "apt" / release.name
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.sources = self.dir / "sources.list"
        opt = f"[arch=arm64 signed-by={archive.keyring}] " if archive.keyring else "[arch=arm64] "
        lines = [f"deb {opt}{archive.main} {suite} main" for suite in release.suites]
        if release.security and archive.security:
            lines.append(f"deb {opt}{archive.security} {release.security} main")
        self.sources.write_text("\n".join(lines) + "\n")
        self.suites = list(release.suites) + ([release.security] if release.security and archive.security else [])
        self.options = [
            "-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
            "-o", f"Dir::State::Lists={self.dir / 'lists'}",
            "-o", f"Dir::Etc::SourceList={self.sources}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::Cache={self.dir / 'cache'}",
            "-o", "Dir::State::status=/dev/null",
            "-o", "Dir::Etc::Preferences=/dev/null", "-o", "Dir::Etc::PreferencesParts=/dev/null",
            "-o", "Acquire::Languages=none", "-o", "APT::Sandbox::User=root",
        ]

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool, *self.options, *args], capture_output=True, text=True, cwd=cwd)

    def update(self, log: Log) -> None:
        p = self._run("apt-get", "-q", "update")
        failed = [l for l in (p.stdout + p.stderr).splitlines() if l.startswith(("Err:", "E:", "W: Failed"))]
        names = self._run("apt-cache", "pkgnames", "linux-image-").stdout.split()
        if not names:
            why = failed[-1] if failed else f"apt-get update exited {p.returncode}"
            raise RealKvmError(f"{self.release.name}: cannot read the Debian archive's arm64 lists "
                               f"for {', '.join(self.suites)}: {why}")
        for line in failed:
            log(f"{self.release.name}: note: {line.strip()}")

    def names(self, prefix: str) -> list[str]:
        return self._run("apt-cache", "pkgnames", prefix).stdout.split()

    def show(self, package: str) -> dict[str, str]:
        """The newest record of `package` (Version, Filename, Depends, ...)."""
        p = self._run("apt-cache", "show", "--no-all-versions", package)
        if p.returncode != 0:
            raise RealKvmError(f"apt-cache show {package}: {last_line(p.stderr, f'exit {p.returncode}')}")
        record: dict[str, str] = {}
        for line in p.stdout.splitlines():
            if not line.strip():
                break
            if ":" in line and not line.startswith(" "):
                k, _, v = line.partition(":")
                record[k] = v.strip()
        return record

    def download(self, package: str, version: str, into: Path) -> Path:
        p = self._run("apt-get", "-q", "download", f"{package}={version}", cwd=into)
        debs = sorted(into.glob("*.deb"))
        if p.returncode != 0 or not debs:
            raise RealKvmError(f"apt-get download {package}={version} failed: "
                               f"{last_line(p.stderr or p.stdout, f'exit {p.returncode}')}")
        return debs[0]


# ---------------------------------------------------------------- fetch

def _newest_first(names: list[str], pattern: str) -> list[str]:
    rx = re.compile(pattern + r"$")
    found = [(tuple(int(g or 0) for g in m.groups()), n) for n in names if (m := rx.match(n))]
    return [n for _, n in sorted(found, reverse=True)]


def _image_package(apt: Apt, image: str, log: Log) -> tuple[str, dict[str, str]]:
    """The package that holds the kernel image: linux-image-* itself, or the
    linux-binary-* it depends on when it is only a dependency shell (7.x)."""
    rec = apt.show(image)
    binary = re.search(r"\b(linux-binary-[^\s,(]+)", rec.get("Depends", ""))
    if binary and binary[1].endswith("-arm64"):
        log(f"{apt.release.name}: {image} is a dependency shell; the image is in {binary[1]}")
        return binary[1], apt.show(binary[1])
    return image, rec


def fetch(name: str, root: Path | None = None, log: Log = print, refresh: bool = False) -> dict:
    """Make sure the newest kernel of release `name` is cached; returns its metadata."""
    if name not in RELEASES:
        raise RealKvmError(f"unknown kernel {name!r} (known: {', '.join(RELEASES)})")
    root = root or cache_root()
    meta = _read_meta(root, name)
    problem = corrupt(meta) if meta else ""
    if problem:
        log(f"{name}: {problem}: fetching it again")
        meta = None
    if meta and not refresh:
        log(f"{name}: cached: {meta['package']} {meta['version']} ({meta['path']})")
        return meta
    for tool, package in (("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")):
        need_tool(tool, package)
    release = RELEASES[name]
    archive = machine_archive()
    apt = Apt(root, release, archive)
    log(f"{name}: updating arm64 package lists ({', '.join(apt.suites)}) from {archive.main}")
    apt.update(log)
    images = _newest_first(apt.names("linux-image-"), release.image)
    if not images:
        raise RealKvmError(f"{name}: no package matching {release.image} in {', '.join(apt.suites)}")
    dest = kernel_dir(root, name)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        # The lists may name packages the mirror no longer (or not yet) serves
        # (e.g. an LTS security pool): take the newest one that downloads.
        for attempt, image in enumerate(images[:MAX_TRIES]):
            package, rec = _image_package(apt, image, log)
            version = rec["Version"]
            if meta and meta["package"] == package and meta["deb_version"] == version:
                log(f"{name}: cached: {package} {version} is still the newest")
                return meta
            log(f"{name}: downloading {package} {version} ({int(rec.get('Size', '0')) / 1e6:.1f} MB)")
            try:
                deb = apt.download(package, version, Path(tmp))
                break
            except RealKvmError as e:
                if attempt + 1 == min(len(images), MAX_TRIES):
                    raise
                short = re.search(r"\s(\d{3}\s+[A-Za-z][A-Za-z ]*?)\s*(?:\[|$)", str(e))
                log(f"{name}: cannot download it ({short[1] if short else e}); trying the next newest")
        log(f"{name}: extracting {deb.name}")
        tree = Path(tmp) / "tree"
        p = subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], capture_output=True, text=True)
        if p.returncode != 0:
            raise RealKvmError(f"dpkg-deb -x {deb.name}: {p.stderr.strip()}")
        image_path, uname = _find_vmlinuz(tree)
        if image_path is None:
            raise RealKvmError(f"{package} {version} holds no boot/vmlinuz-* or usr/lib/modules/*/vmlinuz")
        for old in dest.glob("vmlinuz-*"):
            old.unlink()
        final = dest / f"vmlinuz-{uname}"
        shutil.move(str(image_path), final)
    digest = hashlib.sha256(final.read_bytes()).hexdigest()
    upstream = ".".join(map(str, parse_version(version)))
    meta = {"name": name, "package": package, "deb_version": version, "version": upstream,
            "uname": uname, "sha256": digest, "path": final.name}      # relative: the cache may move
    tmp = dest / ".kernel.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(dest / "kernel.json")
    meta["path"] = str(final)
    log(f"{name}: cached {final} (Linux {upstream}, era {era_for_version(upstream)}, sha256 {digest[:16]}…)")
    return meta


def _find_vmlinuz(tree: Path) -> tuple[Path | None, str]:
    for p in sorted(glob.glob(str(tree / "boot" / "vmlinuz-*"))):
        return Path(p), Path(p).name[len("vmlinuz-"):]
    for p in sorted(glob.glob(str(tree / "usr" / "lib" / "modules" / "*" / "vmlinuz"))):
        return Path(p), Path(p).parent.name
    return None, ""
