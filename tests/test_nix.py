"""The Nix side: every .nix file parses, nix/lib reads templates exactly as Python
does (same normalized data, same error for the same mistake), and the flake's
outputs evaluate with stub inputs, so nothing here needs nixpkgs or the network.

Nix runs with a throwaway HOME and the `dummy://` store: nothing is written to
the user's home or to /nix/store.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from corral.errors import TemplateError
from corral.spec.template import BUILTIN_TEMPLATES, load_template
from corral.spec.units import parse_size

REPO = Path(__file__).resolve().parents[1]
BUILTIN_DIR = REPO / "src" / "corral" / "spec" / "builtin"
READ = "{ path }: (import ./nix/lib).readTemplate path"
FLAKE_INPUTS = ["home-manager", "microvm", "nix-darwin", "nixpkgs"]


@pytest.fixture(scope="module")
def nix_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # In CI every prerequisite is installed: a missing one is a failure, never a skip.
    if shutil.which("nix-instantiate") is None:
        pytest.fail("nix-instantiate is not installed: run `apt-get install nix-bin` (CI does)")
    home = tmp_path_factory.mktemp("nix-home")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        # no nixbld group here; dummy:// never writes to /nix/store
        "NIX_CONFIG": "build-users-group =\nstore = dummy://",
    }
    for name in ("CACHE", "CONFIG", "DATA", "STATE"):
        env[f"XDG_{name}_HOME"] = str(home / name.lower())
    return env


def nix(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-instantiate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def nix_eval(env: dict[str, str], expr: str, **argstrs: str) -> Any:
    args = [arg for name, value in argstrs.items() for arg in ("--argstr", name, value)]
    proc = nix(env, "--eval", "--strict", "--json", *args, "-E", expr)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def read_template(env: dict[str, str], path: Path) -> Any:
    return nix_eval(env, READ, path=str(path))


def read_template_error(env: dict[str, str], path: Path, *options: str) -> str:
    """readTemplate's error as the thrown text (Nix indents continuation lines)."""
    proc = nix(env, *options, "--eval", "--strict", "--argstr", "path", str(path), "-E", READ)
    assert proc.returncode != 0, proc.stdout
    text = proc.stderr.split("\n(use '--show-trace'")[0].rstrip("\n")
    return text.removeprefix("error: ").replace("\n       ", "\n")


def assert_same_data(nix_value: Any, py_value: Any, where: str = "") -> None:
    """Exact, except floats: Nix prints them with 6 significant digits."""
    if isinstance(py_value, float) or isinstance(nix_value, float):
        assert not isinstance(nix_value, bool), where
        assert nix_value == pytest.approx(py_value, rel=1e-5), where
    elif isinstance(py_value, dict):
        assert isinstance(nix_value, dict), where
        assert list(nix_value) == sorted(py_value), where
        for key, value in py_value.items():
            assert_same_data(nix_value[key], value, f"{where}.{key}")
    elif isinstance(py_value, list):
        assert isinstance(nix_value, list), where
        assert len(nix_value) == len(py_value), where
        for i, (a, b) in enumerate(zip(nix_value, py_value, strict=True)):
            assert_same_data(a, b, f"{where}.{i}")
    else:
        assert type(nix_value) is type(py_value), where
        assert nix_value == py_value, where


def nix_files() -> list[Path]:
    """The repository's .nix files, not looking into hidden directories (.git, .venv)."""
    found = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / name for name in names if name.endswith(".nix")]
    return sorted(found)


def test_every_nix_file_parses(nix_env: dict[str, str]) -> None:
    files = nix_files()
    assert REPO / "flake.nix" in files
    assert len(files) >= 15, files
    for path in files:
        proc = nix(nix_env, "--parse", str(path))
        assert proc.returncode == 0, f"{path}: {proc.stderr}"


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_templates_read_as_in_python(nix_env: dict[str, str], name: str) -> None:
    path = BUILTIN_DIR / f"{name}.toml"
    assert_same_data(read_template(nix_env, path), load_template(path).normalized())


VALID = {
    "sizes": """name = "sizes"
[resources]
memory = "1.5G"
disk = "1536K"
vcpus = "0.25"
pids = "4_096"
""",
    "sizes-plain": """name = "sizes-plain"
[resources]
memory = 268435456
disk = " 2 mib\\n"
vcpus = 2
""",
    "sizes-rounding": """name = "sizes-rounding"
[resources]
memory = "1.1G"
disk = "100.7M"
vcpus = 0.3333333
cpuset = "0-3,5"
""",
    "sizes-units": """name = "sizes-units"
[resources]
memory = "0.0156251G"
disk = "1T"
vcpus = true
""",
    "files-out-of-order": """name = "files"
[[files]]
path = "/z/last"
content = "z\\n"
[[files]]
path = "/a//./first/"
content = "multi\\nline\\ttab"
mode = "755"
[[files]]
path = "//m"
content = ""
mode = "00600"
""",
    "duplicate-packages": """name = "pkgs"
base = "debian:bookworm"
packages = ["vim", "git", "vim", "build-essential", "git", "python3"]
""",
    "env-order": """name = "envs"
[env]
Z = "last"
A = "first"
_X = "underscore"
m = "lower"
PATH = "/usr/bin:/bin"
""",
    "mounts": """name = "mounts"
[[mounts]]
source = "@rust-sysroot"
target = "/opt/rust"
optional = true
[[mounts]]
source = "/srv/data/"
target = "//data/./x"
[[mounts]]
source = "/etc/ssl"
target = "/etc/ssl"
optional = "yes"
[[mounts]]
source = "/opt/tools"
target = "/tools"
optional = 0
""",
    "isolation-duplicates": """name = "iso"
isolation = ["microvm", "container", "microvm", "gvisor", "container"]
""",
    "user-table": """name = "users"
[user]
name = "dev"
uid = "2000"
""",
    "user-gid-only": """name = "users2"
[user]
gid = 3000.0
""",
    "missing-sections": 'name = "minimal"\n',
    "pet-service": """name = "actor"
kind = "persistent"
[volume]
size = "64M"
path = "//state/"
[service]
command = ["/data/actor", "--port", "7000"]
ports = [7000, "7001"]
restart = "on-failure"
backoff = "0.5"
crash_limit = 3
[service.env]
Z = "z"
A = "a"
[service.health]
tcp = 7000
interval = 2
""",
    "service-exec-health": """name = "svc"
[volume]
[service]
command = ["sleep", "infinity"]
[service.health]
exec = ["true"]
retries = "2"
timeout = 1
""",
    "every-field": """name = "all.fields_1"
description = "Everything set, and unicode: \u00e9"
base = "busybox"
workdir = "/srv/work/"
network = "egress"
kind = "persistent"
timeout = "30"
isolation = ["gvisor"]
[user]
name = "root"
uid = 0
gid = 0
""",
}


@pytest.mark.parametrize("text", VALID.values(), ids=VALID.keys())
def test_templates_read_as_in_python(nix_env: dict[str, str], tmp_path: Path, text: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    assert_same_data(read_template(nix_env, path), load_template(path).normalized())


def test_vcpus_is_a_float_in_nix(nix_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('name = "x"\n[resources]\nvcpus = 2\n')
    expr = "{ path }: builtins.isFloat ((import ./nix/lib).readTemplate path).resources.vcpus"
    assert nix_eval(nix_env, expr, path=str(path)) is True


INVALID = {
    "unknown-field": ('name = "x"\nbsae = "host"\n', "bsae"),
    "unknown-nested-field": ('name = "x"\n[user]\nshell = "/bin/sh"\n', "user.shell"),
    "unknown-file-field": (
        'name = "x"\n[[files]]\npath = "/a"\ncontent = ""\ncolor = "red"\n',
        "files.0.color",
    ),
    "missing-name": ('base = "host"\n', "name"),
    "missing-name-before-unknown": ("bsae = 1\n", "name"),
    "bad-name-before-unknown": ('name = "Bad"\nbsae = 1\n', "name"),
    "name-not-a-string": ("name = 5\n", "name"),
    "bad-name": ('name = "Bad Name"\n', "name"),
    "bad-base": ('name = "x"\nbase = "ubuntu"\n', "base"),
    "bad-size": ('name = "x"\n[resources]\nmemory = "lots"\n', "resources.memory"),
    "size-too-small": ('name = "x"\n[resources]\nmemory = "1M"\n', "resources.memory"),
    "negative-size": ('name = "x"\n[resources]\ndisk = -1\n', "resources.disk"),
    "bool-size": ('name = "x"\n[resources]\nmemory = true\n', "resources.memory"),
    "bad-network": ('name = "x"\nnetwork = "host"\n', "network"),
    "network-not-a-string": ('name = "x"\nnetwork = 1\n', "network"),
    "packages-without-debian": ('name = "x"\npackages = ["hello"]\n', None),
    "packages-not-a-list": ('name = "x"\npackages = "vim"\n', "packages"),
    "package-not-a-string": (
        'name = "x"\nbase = "debian:bookworm"\npackages = ["ok", 3]\n',
        "packages.1",
    ),
    "bad-package-name": ('name = "x"\nbase = "debian:bookworm"\npackages = ["Vim"]\n', "packages"),
    "relative-workdir": ('name = "x"\nworkdir = "relative"\n', "workdir"),
    "dotdot-workdir": ('name = "x"\nworkdir = "/a/../b"\n', "workdir"),
    "bad-cpuset": ('name = "x"\n[resources]\ncpuset = "a-b"\n', "resources.cpuset"),
    "zero-vcpus": ('name = "x"\n[resources]\nvcpus = 0\n', "resources.vcpus"),
    "nan-vcpus": ('name = "x"\n[resources]\nvcpus = nan\n', "resources.vcpus"),
    "too-many-vcpus": ('name = "x"\n[resources]\nvcpus = 300\n', "resources.vcpus"),
    "vcpus-not-a-number": ('name = "x"\n[resources]\nvcpus = "abc"\n', "resources.vcpus"),
    "too-few-pids": ('name = "x"\n[resources]\npids = "7"\n', "resources.pids"),
    "bad-isolation": ('name = "x"\nisolation = ["vm"]\n', "isolation.0"),
    "isolation-not-a-string": ('name = "x"\nisolation = ["container", 1]\n', "isolation.1"),
    "no-isolation": ('name = "x"\nisolation = []\n', "isolation"),
    "relative-mount-source": (
        'name = "x"\n[[mounts]]\nsource = "rel"\ntarget = "/t"\n',
        "mounts.0.source",
    ),
    "unknown-special-source": (
        'name = "x"\n[[mounts]]\nsource = "@nope"\ntarget = "/t"\n',
        "mounts.0.source",
    ),
    "reserved-mount-target": (
        'name = "x"\n[[mounts]]\nsource = "/a"\ntarget = "/proc/x"\n',
        "mounts.0.target",
    ),
    "root-mount-target": (
        'name = "x"\n[[mounts]]\nsource = "/a"\ntarget = "/"\n',
        "mounts.0.target",
    ),
    "bad-optional": (
        'name = "x"\n[[mounts]]\nsource = "/a"\ntarget = "/b"\noptional = "maybe"\n',
        "mounts.0.optional",
    ),
    "bad-mode": (
        'name = "x"\n[[files]]\npath = "/a"\ncontent = ""\nmode = "rwx"\n',
        "files.0.mode",
    ),
    "missing-content": ('name = "x"\n[[files]]\npath = "/a"\n', "files.0.content"),
    "file-not-a-table": ('name = "x"\nfiles = ["a"]\n', "files.0"),
    "duplicate-file-paths": (
        'name = "x"\n[[files]]\npath = "/a"\ncontent = ""\n'
        '[[files]]\npath = "/a/"\ncontent = "b"\n',
        None,
    ),
    "uid-too-large": ('name = "x"\n[user]\nuid = 70000\n', "user.uid"),
    "fractional-uid": ('name = "x"\n[user]\nuid = 1.5\n', "user.uid"),
    "huge-float-uid": ('name = "x"\n[user]\nuid = 1e30\n', "user.uid"),
    "uid-not-a-number": ('name = "x"\n[user]\nuid = "12a"\n', "user.uid"),
    "user-not-a-table": ('name = "x"\nuser = "root"\n', "user"),
    "bad-env-name": ('name = "x"\n[env]\n"1BAD" = "v"\n', "env"),
    "name-trailing-newline": ('name = "newline\\n"\n', "name"),
    "double-slash-reserved-target": (
        'name = "x"\n[[mounts]]\nsource = "/a"\ntarget = "//proc/x"\n',
        "mounts.0.target",
    ),
    "env-not-a-table": ('name = "x"\nenv = ["A"]\n', "env"),
    "env-value-not-a-string": ('name = "x"\n[env]\nA = 1\n', "env.A"),
    "zero-timeout": ('name = "x"\ntimeout = 0\n', "timeout"),
    "fractional-timeout": ('name = "x"\ntimeout = 1.5\n', "timeout"),
    "bad-kind": ('name = "x"\nkind = "forever"\n', "kind"),
    "description-not-a-string": ('name = "x"\ndescription = 3\n', "description"),
    "volume-too-small": ('name = "x"\n[volume]\nsize = "512K"\n', "volume.size"),
    "volume-reserved-path": ('name = "x"\n[volume]\npath = "/dev/x"\n', "volume.path"),
    "volume-unknown-field": ('name = "x"\n[volume]\nquota = 1\n', "volume.quota"),
    "service-without-command": ('name = "x"\n[service]\nports = [1]\n', "service.command"),
    "service-empty-command": ('name = "x"\n[service]\ncommand = []\n', "service.command"),
    "service-bad-port": (
        'name = "x"\n[service]\ncommand = ["a"]\nports = [70000]\n',
        "service.ports.0",
    ),
    "service-bad-restart": (
        'name = "x"\n[service]\ncommand = ["a"]\nrestart = "never"\n',
        "service.restart",
    ),
    "service-zero-backoff": (
        'name = "x"\n[service]\ncommand = ["a"]\nbackoff = 0\n',
        "service.backoff",
    ),
    "service-bad-env": (
        'name = "x"\n[service]\ncommand = ["a"]\nenv = {"1X" = "v"}\n',
        "service.env",
    ),
    "health-no-probe": (
        'name = "x"\n[service]\ncommand = ["a"]\n[service.health]\ninterval = 1\n',
        "service.health",
    ),
    "health-two-probes": (
        'name = "x"\n[service]\ncommand = ["a"]\n[service.health]\ntcp = 1\nexec = ["true"]\n',
        "service.health",
    ),
    "health-bad-port": (
        'name = "x"\n[service]\ncommand = ["a"]\n[service.health]\ntcp = "http"\n',
        "service.health.tcp",
    ),
    "health-zero-retries": (
        'name = "x"\n[service]\ncommand = ["a"]\n[service.health]\ntcp = 1\nretries = 0\n',
        "service.health.retries",
    ),
}


@pytest.mark.parametrize(("text", "field"), INVALID.values(), ids=INVALID.keys())
def test_each_mistake_is_refused_alike(
    nix_env: dict[str, str], tmp_path: Path, text: str, field: str | None
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TemplateError) as info:
        load_template(path)
    assert info.value.field == field
    message = read_template_error(nix_env, path)
    if field is not None:
        assert f"field '{field}'" in message
    assert message == str(info.value)


def test_malformed_toml_is_refused_by_both(nix_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nbase = \n')
    with pytest.raises(TemplateError, match="not valid TOML"):
        load_template(path)
    assert "while parsing a TOML string" in read_template_error(nix_env, path)
    # Only --show-trace names the file: Nix cannot catch fromTOML's error to add it.
    traced = read_template_error(nix_env, path, "--show-trace")
    assert f"while reading the Corral template {path}" in traced


@pytest.mark.parametrize(
    "text",
    [
        'name = "x"\n[resources]\nmemory = 1.5\n',
        'name = "x"\n[resources]\ndisk = [1]\n',
    ],
    ids=["float", "array"],
)
def test_size_of_the_wrong_type_is_refused(
    nix_env: dict[str, str], tmp_path: Path, text: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    message = read_template_error(nix_env, path)
    assert "a size must be a number of bytes or a string like '512M'" in message
    assert "field 'resources." in message


def test_python_refuses_a_float_size(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[resources]\nmemory = 1.5\n')
    with pytest.raises(TemplateError):
        load_template(path)


def test_image_key_matches_python(nix_env: dict[str, str], tmp_path: Path) -> None:
    paths = [BUILTIN_DIR / f"{name}.toml" for name in BUILTIN_TEMPLATES]
    for key in (
        *("files-out-of-order", "duplicate-packages", "mounts", "env-order"),
        *("pet-service", "service-exec-health"),
    ):
        paths.append(tmp_path / f"{key}.toml")
        paths[-1].write_text(VALID[key])
    unicode = tmp_path / "unicode.toml"
    unicode.write_text('name = "u"\n[[files]]\npath = "/a"\ncontent = "\u00e9"\n')
    keys = nix_eval(
        nix_env,
        "{ paths }: let l = import ./nix/lib; in "
        "map (p: l.imageKey (l.readTemplate p)) (builtins.fromJSON paths)",
        paths=json.dumps([str(p) for p in [*paths, unicode]]),
    )
    assert keys[:-1] == [load_template(p).image_key() for p in paths]
    # Python's json.dumps escapes non-ASCII, Nix's toJSON does not: no key, not a wrong one.
    assert keys[-1] is None


SIZES = [
    *("512M", "1.5G", "64K", "1.5GiB", "2gb", "5b", "5ib", " 7 k ", "5 \n ", "0", "00012M"),
    *("0.1G", "0.3M", "1.7g", "4.4M", "0.001K", "1.0000000001G", "123456789.987654321K"),
    *("8388607.9999999T", "3T", "7 k ib", "1.", ".5M", "1e3", "abc", "", "-5M"),
]


def test_sizes_parse_as_in_python(nix_env: dict[str, str]) -> None:
    results = nix_eval(
        nix_env,
        "{ values }: let l = import ./nix/lib; in map (v: let r = builtins.tryEval "
        '(l.parseSize "f" v); in if r.success then r.value else null) (builtins.fromJSON values)',
        values=json.dumps(SIZES),
    )
    expected = []
    for value in SIZES:
        try:
            expected.append(parse_size(value))
        except ValueError:
            expected.append(None)
    assert dict(zip(SIZES, results, strict=True)) == dict(zip(SIZES, expected, strict=True))


LAX = {
    "float": (
        float,
        [
            *("1_5", "1_.5", "1._5", "1e1", "1E+1", "1.e1", "5.", ".5", "+1.5", " 1.5\t\n"),
            *("\x0b1.5", "00.5", "0_0.5", "1e_1", "_1", "1__5", "1.5e", "e3", ".e3", "1_"),
            *("inf", "-Infinity", "nan", "2.5e-1", "0.0000000000000000000001e22", "1e400"),
            *("", ".", "0.1", "123456789.123456789", True, 3),
        ],
    ),
    "int": (
        int,
        [
            *(" +0_1.00 ", "1_000.0", "10_00.0_0", "-5", "01000", "1000.", "1e3", "_1"),
            *("1__0", "+-1", "0.0", "-0", "12345678901234567", 2.0, 2.5, 1e30, True),
        ],
    ),
    "bool": (
        bool,
        [
            *("True", "TRUE", " true", "yes", "Y", "on", "1", "0", "off", "no", "n"),
            *("f", "t", "2", 0, 1, 2, 0.0, 1.0, 0.5),
        ],
    ),
}


@pytest.mark.parametrize("kind", LAX)
def test_lax_coercions_match_pydantic(nix_env: dict[str, str], kind: str) -> None:
    """Strings (and other types) in numeric and boolean fields, as pydantic coerces them."""
    python_type, values = LAX[kind]
    # inf and nan have no JSON form: Nix names them.
    results = nix_eval(
        nix_env,
        "{ values }: let c = import ./nix/lib/coerce.nix; inf = 1.0e308 * 10; "
        'show = x: if builtins.isFloat x && x != x then "nan" else if x == inf then "inf" '
        'else if x == -inf then "-inf" else x; in map (v: let r = builtins.tryEval '
        f'(c.{kind} {{ file = "f"; loc = [ ]; }} v); in if r.success then show r.value '
        'else "refused") (builtins.fromJSON values)',
        values=json.dumps(values),
    )
    adapter = TypeAdapter(python_type)
    for value, result in zip(values, results, strict=True):
        try:
            expected = adapter.validate_python(value)
        except ValidationError:
            assert result == "refused", value
            continue
        if isinstance(expected, float) and not math.isfinite(expected):
            assert result == str(expected), value
        elif isinstance(expected, float):
            assert result == pytest.approx(expected, rel=1e-5), value
        else:
            assert type(result) is type(expected), value
            assert result == expected, value


def microvm_for(env: dict[str, str], path: Path) -> Any:
    expr = "{ path }: let l = import ./nix/lib; in l.microvmFor (l.readTemplate path) { }"
    return nix_eval(env, expr, path=str(path))


def test_microvm_settings_follow_the_template(nix_env: dict[str, str], tmp_path: Path) -> None:
    default = microvm_for(nix_env, BUILTIN_DIR / "default.toml")
    assert default["hypervisor"] == "firecracker"
    assert default["storeOnDisk"] is True
    assert default["storeDiskType"] == "erofs"
    assert default["shares"] == []
    assert (default["vcpu"], default["mem"], default["interfaces"]) == (1, 512, [])

    # The rust template's only mount is optional and special: nothing to share.
    assert microvm_for(nix_env, BUILTIN_DIR / "rust.toml")["hypervisor"] == "firecracker"

    shared = tmp_path / "shared.toml"
    shared.write_text(
        'name = "shared"\nnetwork = "egress"\n[resources]\nvcpus = 0.5\nmemory = "100M"\n'
        '[[mounts]]\nsource = "/srv/data"\ntarget = "/data"\n'
    )
    vm = microvm_for(nix_env, shared)
    assert vm["hypervisor"] == "cloud-hypervisor"
    assert vm["storeOnDisk"] is False
    assert [(s["tag"], s["proto"], s["readOnly"]) for s in vm["shares"]] == [
        ("ro-store", "virtiofs", True),
        ("mount0", "virtiofs", True),
    ]
    assert (vm["vcpu"], vm["cpuQuotaPercent"], vm["mem"]) == (1, 50, 256)
    [tap] = vm["interfaces"]
    assert tap["type"] == "tap"
    assert len(tap["id"].encode()) <= 15
    assert tap["mac"].startswith("02:")
    assert len(tap["mac"].split(":")) == 6

    persistent = tmp_path / "persistent.toml"
    persistent.write_text('name = "keep"\nkind = "persistent"\n[resources]\ndisk = "1G"\n')
    vm = microvm_for(nix_env, persistent)
    assert vm["hypervisor"] == "qemu"
    assert vm["shares"][0]["proto"] == "9p"
    assert vm["volumes"] == [{"image": "keep-work.img", "mountPoint": "/work", "size": 1024}]


def test_oci_config_follows_the_template(nix_env: dict[str, str]) -> None:
    path = BUILTIN_DIR / "rust.toml"
    expr = "{ path }: let l = import ./nix/lib; in l.ociConfigFor (l.readTemplate path)"
    config = nix_eval(nix_env, expr, path=str(path))
    template = load_template(path)
    assert config["Env"] == [f"{k}={v}" for k, v in template.normalized()["env"].items()]
    assert config["User"] == f"{template.user.uid}:{template.user.gid}"
    assert config["WorkingDir"] == template.workdir
    assert config["Labels"]["dev.corral.image-key"] == template.image_key()


STUB_FLAKE = """
let
  flake = import ./flake.nix;
  stub = name: throw "the flake forced input ${name}";
  self = flake.outputs {
    inherit self;
    nixpkgs = stub "nixpkgs";
    microvm = stub "microvm";
    nix-darwin = stub "nix-darwin";
    home-manager = stub "home-manager";
  };
  names = builtins.attrNames;
in
"""


def test_flake_inputs(nix_env: dict[str, str]) -> None:
    inputs = nix_eval(nix_env, "(import ./flake.nix).inputs")
    assert sorted(inputs) == FLAKE_INPUTS
    assert inputs["nixpkgs"]["url"].startswith("github:NixOS/nixpkgs/")
    for name in ("microvm", "nix-darwin", "home-manager"):
        assert inputs[name]["inputs"]["nixpkgs"]["follows"] == "nixpkgs"


def test_flake_lock_pins_every_input(nix_env: dict[str, str]) -> None:
    inputs = nix_eval(nix_env, "(import ./flake.nix).inputs")
    lock = json.loads((REPO / "flake.lock").read_text())
    assert lock["version"] == 7
    nodes = lock["nodes"]
    assert sorted(nodes[lock["root"]]["inputs"]) == FLAKE_INPUTS
    for name, spec in inputs.items():
        node = nodes[nodes[lock["root"]]["inputs"][name]]
        kind, _, rest = spec["url"].partition(":")
        owner, repo, *ref = rest.split("/")
        assert node["original"] == {
            "type": kind,
            "owner": owner,
            "repo": repo,
            **({"ref": ref[0]} if ref else {}),
        }
        locked = node["locked"]
        assert (locked["owner"], locked["repo"], locked["type"]) == (owner, repo, kind)
        assert len(locked["rev"]) == 40
        assert int(locked["rev"], 16) >= 0
        for sub, follow in spec.get("inputs", {}).items():
            path = follow["follows"]
            assert node["inputs"][sub] == (path.split("/") if path else [])


def test_flake_outputs_evaluate_without_nixpkgs(nix_env: dict[str, str]) -> None:
    outputs = nix_eval(
        nix_env,
        STUB_FLAKE
        + """{
  outputs = names self;
  packages = builtins.mapAttrs (_: names) self.packages;
  nixosModules = names self.nixosModules;
  nixosConfigurations = names self.nixosConfigurations;
  darwinConfigurations = names self.darwinConfigurations;
  colmena = names self.colmena;
  templateNames = self.lib.templateNames;
}""",
    )
    assert outputs["outputs"] == [
        "colmena",
        "darwinConfigurations",
        "lib",
        "nixosConfigurations",
        "nixosModules",
        "overlays",
        "packages",
    ]
    names = sorted(BUILTIN_TEMPLATES)
    assert outputs["templateNames"] == names
    expected = sorted(
        ["corral", "default"] + [f"{n}-oci" for n in names] + [f"{n}-microvm" for n in names]
    )
    assert outputs["packages"] == {"aarch64-linux": expected, "x86_64-linux": expected}
    assert outputs["nixosModules"] == ["corral-host", "default", "sandbox"]
    assert outputs["nixosConfigurations"] == [
        "aws-container-host",
        "metal-microvm-host",
        *(f"sandbox-{n}" for n in names),
    ]
    assert outputs["darwinConfigurations"] == ["dev-mac"]
    assert outputs["colmena"] == ["aws-container-host", "meta", "metal-microvm-host"]


def test_flake_lib_reads_templates(nix_env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(VALID["mounts"])
    expr = "{ path }: " + STUB_FLAKE + "self.lib.readTemplate path"
    assert_same_data(nix_eval(nix_env, expr, path=str(path)), load_template(path).normalized())
