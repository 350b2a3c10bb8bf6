"""Read a VMM's published API (Swagger 2.0 or OpenAPI 3.0 YAML) and check requests against it.

`ApiSpec.match()` finds the operation for a method and path (or says the
path or method is not in the spec); `validate_body()` checks a JSON body
against the operation's schema with every `$ref` resolved in the spec file
itself. Checking is stricter than the schemas in one way: properties a schema
does not name are refused, as Firecracker's API parser does (serde
`deny_unknown_fields`), so a misspelt field cannot pass silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPECS_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "specs"
FIRECRACKER_SPEC = SPECS_DIR / "firecracker.yaml"
CLOUD_HYPERVISOR_SPEC = SPECS_DIR / "cloud-hypervisor.yaml"
_METHODS = ("get", "put", "patch", "post", "delete")

_INT_RANGES = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
}
_FORMATS = jsonschema.FormatChecker(formats=())
for _name, (_low, _high) in _INT_RANGES.items():

    def _in_range(value: object, low: int = _low, high: int = _high) -> bool:
        return not isinstance(value, int) or isinstance(value, bool) or low <= value <= high

    _FORMATS.checks(_name)(_in_range)


@dataclass(frozen=True)
class Operation:
    method: str  # upper case
    template: str  # the spec's path, e.g. /drives/{drive_id}
    regex: re.Pattern[str]
    spec: dict[str, Any]

    @property
    def summary(self) -> str:
        return str(self.spec.get("summary", ""))

    @property
    def description(self) -> str:
        return str(self.spec.get("description", ""))

    def statuses(self) -> set[str]:
        return {str(code) for code in self.spec.get("responses", {})}


@dataclass(frozen=True)
class Match:
    operation: Operation
    params: dict[str, str]


class NoSuchPath(LookupError):
    """The path is not in the spec."""


class MethodNotInSpec(LookupError):
    """The path is in the spec, but not with this method."""


def _load_yaml(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open() as file:
        document = yaml.load(file, Loader=loader)
    assert isinstance(document, dict)
    return document


def _forbid_unknown_properties(node: Any) -> Any:
    """Copy of a schema tree where objects listing `properties` admit no others."""
    if isinstance(node, list):
        return [_forbid_unknown_properties(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _forbid_unknown_properties(value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out and "$ref" not in out:
        out["additionalProperties"] = False
    return out


class ApiSpec:
    """One VMM's published API."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.document = _load_yaml(path)
        self.is_swagger = str(self.document.get("swagger", "")).startswith("2")
        self.version = str(self.document["info"]["version"])
        if self.is_swagger:
            self.base_path = str(self.document.get("basePath", "/")).rstrip("/")
            schemas = {"definitions": self.document["definitions"]}
        else:
            server = str(self.document["servers"][0]["url"])
            self.base_path = re.sub(r"^[a-z]+://[^/]+", "", server).rstrip("/")
            schemas = {"components": {"schemas": self.document["components"]["schemas"]}}
        # A root of only the schemas: "#/definitions/X" and "#/components/schemas/X" resolve in it.
        self._root = _forbid_unknown_properties(schemas)
        self.operations: list[Operation] = []
        for template, item in self.document["paths"].items():
            pattern = re.sub(r"\\\{([a-z_]+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            regex = re.compile(f"^{re.escape(self.base_path)}{pattern}$")
            for method in _METHODS:
                if method in item:
                    self.operations.append(Operation(method.upper(), template, regex, item[method]))

    def match(self, method: str, path: str) -> Match:
        path_known = False
        for operation in self.operations:
            found = operation.regex.match(path)
            if found is None:
                continue
            path_known = True
            if operation.method == method.upper():
                return Match(operation, found.groupdict())
        if path_known:
            raise MethodNotInSpec(f"{method} is not an operation on {path} in {self.path.name}")
        raise NoSuchPath(f"{path} is not a path in {self.path.name}")

    def operation(self, method: str, template: str) -> Operation:
        for operation in self.operations:
            if operation.method == method.upper() and operation.template == template:
                return operation
        raise KeyError((method, template))

    def body_schema(self, operation: Operation) -> tuple[dict[str, Any] | None, bool]:
        """The request body's schema and whether a body is required (None: takes no body)."""
        if self.is_swagger:
            for parameter in operation.spec.get("parameters", []):
                if parameter.get("in") == "body":
                    return parameter["schema"], bool(parameter.get("required", False))
            return None, False
        body = operation.spec.get("requestBody")
        if body is None:
            return None, False
        return body["content"]["application/json"]["schema"], bool(body.get("required", False))

    def response_schema(self, operation: Operation, status: int) -> dict[str, Any] | None:
        responses = operation.spec.get("responses", {})
        response = responses.get(status, responses.get(str(status), responses.get("default")))
        if response is None:
            return None
        if self.is_swagger:
            schema = response.get("schema")
        else:
            schema = response.get("content", {}).get("application/json", {}).get("schema")
        return schema if isinstance(schema, dict) else None

    def documents_status(self, operation: Operation, status: int) -> bool:
        codes = operation.statuses()
        return str(status) in codes or "default" in codes

    def validate(self, schema: dict[str, Any], instance: Any) -> list[str]:
        """Every way `instance` breaks `schema` (refs resolved in this spec), as messages."""
        root = {**self._root, **_forbid_unknown_properties(schema)}
        validator = jsonschema.Draft4Validator(root, format_checker=_FORMATS)
        errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
        return [
            f"{'/'.join(str(p) for p in error.absolute_path) or '<body>'}: {error.message}"
            for error in errors
        ]

    def validate_body(self, operation: Operation, body: Any, *, present: bool) -> list[str]:
        schema, required = self.body_schema(operation)
        if schema is None:
            return ["this operation takes no request body"] if present else []
        if not present:
            return ["a request body is required"] if required else []
        return self.validate(schema, body)


def firecracker_spec() -> ApiSpec:
    return ApiSpec(FIRECRACKER_SPEC)


def cloud_hypervisor_spec() -> ApiSpec:
    return ApiSpec(CLOUD_HYPERVISOR_SPEC)
