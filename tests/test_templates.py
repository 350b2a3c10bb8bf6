"""Template loading and validation: every mistake names the file, the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.errors import NotFoundError, TemplateError
from corral.spec.template import BUILTIN_TEMPLATES, Isolation, load_template


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.toml"
    path.write_text(text)
    return path


def test_builtins_load_with_defaults() -> None:
    for name in BUILTIN_TEMPLATES:
        template = load_template(name)
        assert template.name == name
        assert template.user.uid != 0, "built-in templates run as non-root"
        assert template.network == "none"
    rust = load_template("rust")
    assert rust.resources.memory == 1 << 30
    assert any(m.source == "@rust-sysroot" for m in rust.mounts)


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    template = load_template(write(tmp_path, 'name = "mini"\n'))
    assert template.base == "host"
    assert template.resources.memory == 512 << 20
    assert template.isolation == (Isolation.CONTAINER, Isolation.GVISOR, Isolation.MICROVM)
    assert template.normalized()["resources"]["disk"] == 256 << 20


def test_image_key_ignores_name_and_resources(tmp_path: Path) -> None:
    a = load_template(write(tmp_path, 'name = "a"\n[resources]\nmemory = "1G"\n'))
    b = load_template(write(tmp_path, 'name = "b"\n'))
    c = load_template(write(tmp_path, 'name = "c"\nworkdir = "/code"\n'))
    assert a.image_key() == b.image_key()
    assert a.image_key() != c.image_key()


@pytest.mark.parametrize(
    ("text", "field", "fix_word"),
    [
        ('name = "x"\nbase = "ubuntu"\n', "base", "host"),
        ('name = "x"\nbsae = "host"\n', "bsae", "known fields"),
        ('base = "host"\n', "name", "name ="),
        ('name = "Bad Name"\n', "name", "lowercase"),
        ('name = "x"\nworkdir = "relative"\n', "workdir", "absolute"),
        ('name = "x"\n[resources]\nmemory = "lots"\n', "resources.memory", "memory"),
        ('name = "x"\n[resources]\nmemory = "1M"\n', "resources.memory", "memory"),
        ('name = "x"\n[resources]\ncpuset = "a-b"\n', "resources.cpuset", "resources"),
        ('name = "x"\nnetwork = "host"\n', "network", "none"),
        ('name = "x"\nisolation = ["vm"]\n', "isolation.0", "container"),
        ('name = "x"\npackages = ["hello"]\n', None, "readme"),
        ('name = "x"\n[[mounts]]\nsource = "rel"\ntarget = "/t"\n', "mounts.0.source", "absolute"),
        (
            'name = "x"\n[[mounts]]\nsource = "/a"\ntarget = "/proc/x"\n',
            "mounts.0.target",
            "mounts",
        ),
        (
            'name = "x"\n[[files]]\npath = "/a"\ncontent = ""\nmode = "rwx"\n',
            "files.0.mode",
            "octal",
        ),
        ('name = "x"\n[user]\nuid = 70000\n', "user.uid", "uid"),
        ('name = "x"\n[env]\n"1BAD" = "v"\n', "env", "NAME"),
    ],
)
def test_each_mistake_is_named(tmp_path: Path, text: str, field: str | None, fix_word: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TemplateError) as info:
        load_template(path)
    error = info.value
    assert error.file == str(path)
    assert error.field == field
    assert error.hint is not None
    assert fix_word.lower() in (error.hint + error.message).lower(), str(error)
    assert str(path) in str(error)


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as info:
        load_template(write(tmp_path, 'name = "x"\nbase = \n'))
    assert "line 2" in str(info.value)


def test_unknown_template_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="unknown template 'nosuch'") as info:
        load_template("nosuch")
    assert info.value.hint
    assert "default" in info.value.hint
    with pytest.raises(NotFoundError, match="does not exist"):
        load_template(tmp_path / "missing.toml")
