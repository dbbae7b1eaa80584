"""A container image with Ray, made here without any registry: a stand-in for a site's image.

The root filesystem is put together from this machine's own files: Debian's python3.11 and
its standard library, a venv's site-packages (Ray and what it needs) at /opt/ray, sh and a few
core tools, and every shared library these load (as ldd finds them). ``podman import`` makes
it an image whose PATH starts with /opt/ray/bin, so ``ray`` and ``python3`` are the image's
own, not the host's venv. Nothing is downloaded."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import re
import shutil
import subprocess
import tarfile

PYTHON = pathlib.Path("/usr/bin/python3.11")
STDLIB = pathlib.Path("/usr/lib/python3.11")
TOOLS = ["/bin/sh", "/bin/dash", "/bin/bash", "/usr/bin/env", "/usr/bin/cat", "/usr/bin/ls", "/usr/bin/sleep",
         "/usr/bin/id", "/usr/bin/mkdir", "/usr/bin/rm", "/usr/bin/uname"]
IMAGE_PATH = "/opt/ray/bin:/usr/local/bin:/usr/bin:/bin"
LOADER = "/lib64/ld-linux-x86-64.so.2"


def _shared_libraries(files: list[str]) -> set[str]:
    """Every library (absolute path) the given ELF files load, outside the files' own tree."""
    libs: set[str] = set()
    for start in range(0, len(files), 200):
        result = subprocess.run(["ldd", *files[start:start + 200]], capture_output=True, text=True, check=False)
        libs.update(re.findall(r"=> (/\S+) \(0x", result.stdout))
    return libs


def _elf_files(root: pathlib.Path) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and (".so" in path.name or os.access(path, os.X_OK)):
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append(str(path))
    return found


def image_tag(venv: pathlib.Path) -> str:
    """A tag that changes with the venv's packages: an image is built once per venv."""
    listing = sorted(p.name for p in (venv / "lib" / "python3.11" / "site-packages").iterdir())
    return "localhost/activate-ray-bed/ray:" + hashlib.sha256("\n".join(listing).encode()).hexdigest()[:12]


def build_rootfs_tar(venv: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The image's root filesystem as a tar (written to out, readable by everyone)."""
    site = venv / "lib" / "python3.11" / "site-packages"
    elf = [str(PYTHON), *TOOLS, *_elf_files(STDLIB / "lib-dynload"), *_elf_files(site)]
    # the libraries a wheel bundles (numpy.libs/, ...) come with site-packages itself
    libs = {os.path.normpath(lib) for lib in _shared_libraries([f for f in elf if os.path.exists(f)])
            if not os.path.normpath(lib).startswith(str(venv) + "/")} | {LOADER}
    ray_script = (venv / "bin" / "ray").read_text().split("\n", 1)[1]  # its body, without the venv's shebang

    def add_file(tar: tarfile.TarFile, source: str, name: str | None = None) -> None:
        real = os.path.realpath(source)
        info = tar.gettarinfo(real, arcname=(name or source).lstrip("/"))
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        with open(real, "rb") as f:
            tar.addfile(info, f)

    def add_text(tar: tarfile.TarFile, name: str, text: str, mode: int = 0o644) -> None:
        data = text.encode()
        info = tarfile.TarInfo(name.lstrip("/"))
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))

    def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(name.lstrip("/"))
        info.type, info.mode = tarfile.DIRTYPE, mode
        tar.addfile(info)

    def add_link(tar: tarfile.TarFile, name: str, target: str) -> None:
        info = tarfile.TarInfo(name.lstrip("/"))
        info.type, info.linkname = tarfile.SYMTYPE, target
        tar.addfile(info)

    def skip_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if "__pycache__" in info.name.split("/") or info.name.endswith(".pyc"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mode |= 0o444 | (0o111 if info.isdir() else 0)
        return info

    class OnceTar(tarfile.TarFile):
        """Each path once (merged /usr: ldd names /lib/x and /usr/lib/x; podman refuses duplicates)."""

        def addfile(self, tarinfo, fileobj=None, **kw):
            name = tarinfo.name.rstrip("/")
            if name in names:
                return
            names.add(name)
            super().addfile(tarinfo, fileobj, **kw)

    names: set[str] = set()
    tmp = out.with_suffix(".partial")
    with OnceTar.open(tmp, "w") as tar:
        for name in ("/bin", "/usr", "/usr/bin", "/usr/lib", "/lib", "/lib64", "/etc", "/proc", "/sys", "/dev",
                     "/run", "/home", "/opt", "/opt/ray", "/opt/ray/bin", "/opt/ray/lib", "/opt/ray/lib/python3.11"):
            add_dir(tar, name)
        add_dir(tar, "/tmp", 0o1777)
        add_dir(tar, "/var")
        add_dir(tar, "/var/tmp", 0o1777)
        files = sorted(libs | {str(PYTHON), *[t for t in TOOLS if os.path.exists(t)]})
        made = {"/bin", "/usr", "/usr/bin", "/usr/lib", "/lib", "/lib64", "/etc"}
        for path in files:  # every parent dir first, then the file
            parents = []
            parent = os.path.dirname(path)
            while parent not in made and parent != "/":
                parents.append(parent)
                parent = os.path.dirname(parent)
            for directory in reversed(parents):
                add_dir(tar, directory)
                made.add(directory)
            add_file(tar, path)
        tar.add(str(STDLIB), arcname=str(STDLIB).lstrip("/"), filter=lambda i: None if i.name.startswith("usr/lib/python3.11/test") else skip_caches(i))
        tar.add(str(site), arcname="opt/ray/lib/python3.11/site-packages", filter=skip_caches)
        add_link(tar, "/usr/bin/python3", "python3.11")
        add_link(tar, "/opt/ray/bin/python", str(PYTHON))
        add_link(tar, "/opt/ray/bin/python3", str(PYTHON))
        add_text(tar, "/opt/ray/pyvenv.cfg", "home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11\n")
        add_text(tar, "/opt/ray/bin/ray", "#!/opt/ray/bin/python\n" + ray_script, 0o755)
        add_text(tar, "/etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n")
        add_text(tar, "/etc/group", "root:x:0:\nnogroup:x:65534:\n")
        add_text(tar, "/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n")
    tmp.chmod(0o644)
    tmp.rename(out)
    return out


def import_command(tar: pathlib.Path, tag: str) -> list[str]:
    """podman import of the root filesystem, with the image's PATH (its own ray first)."""
    return ["podman", "import", "--change", f"ENV PATH={IMAGE_PATH}", "--change", "ENV LANG=C.UTF-8",
            str(tar), tag]


if __name__ == "__main__":  # python -m tests.bed.ray_image VENV OUT.tar
    import sys

    built = build_rootfs_tar(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
    print(built, shutil.disk_usage(built.parent).free // 2**20, "MB free")
