"""The service's `/docs`: an API reference rendered on the server from its own OpenAPI schema, as one HTML page with
no script and no asset from elsewhere, so it reads the same on a cluster without internet (FastAPI's Swagger UI and
ReDoc pages load their JavaScript and CSS from a CDN and were blank there). Tools read `/openapi.json`."""

from __future__ import annotations

import json
from html import escape
from typing import Any

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ccc; }
.op { border: 1px solid #ddd; border-radius: 6px; margin: 1.2rem 0; padding: 0.6rem 1rem; }
.method { display: inline-block; min-width: 4rem; font-weight: bold; color: #fff; background: #555;
          border-radius: 4px; padding: 0.1rem 0.5rem; text-align: center; }
.get { background: #2b6cb0; } .post { background: #2f855a; }
code, pre { font-family: ui-monospace, monospace; font-size: 13px; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.4rem 0; } td, th { border: 1px solid #ddd; padding: 0.25rem 0.5rem;
text-align: left; vertical-align: top; }
"""


def render_docs(schema: dict[str, Any]) -> str:
    """The HTML reference of an OpenAPI schema: each operation (parameters, body, responses, security), then each
    component schema (fields, types, constraints), with links between them."""
    info = schema.get("info", {})
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(info.get('title', 'API'))}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>{escape(info.get('title', 'API'))}</h1><p>version {escape(str(info.get('version', '')))} · "
             f"the machine-readable schema: <a href='openapi.json'>openapi.json</a></p>",
             f"<p>{escape(info.get('description', ''))}</p>", _security(schema), "<h2>Operations</h2>"]
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            parts.append(_operation(path, method, op))
    components = schema.get("components", {}).get("schemas", {})
    if components:
        parts.append("<h2>Schemas</h2>")
        parts += [_component(name, body) for name, body in components.items()]
    parts.append("</body></html>")
    return "\n".join(parts)


def _security(schema: dict[str, Any]) -> str:
    schemes = schema.get("components", {}).get("securitySchemes", {})
    if not schemes:
        return ""
    items = "".join(f"<li><code>{escape(name)}</code>: {escape(s.get('type', ''))} {escape(s.get('scheme', ''))} "
                    f"{escape(s.get('description', ''))}</li>" for name, s in schemes.items())
    return f"<h2>Authentication</h2><ul>{items}</ul>"


def _operation(path: str, method: str, op: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p.get('in', ''))}</td>"
        f"<td>{'required' if p.get('required') else 'optional'}</td><td>{_type(p.get('schema', {}))}</td>"
        f"<td>{escape(p.get('description', '') or p.get('schema', {}).get('description', ''))}</td></tr>"
        for p in op.get("parameters", []))
    params = f"<table><tr><th>parameter</th><th>in</th><th></th><th>type</th><th></th></tr>{rows}</table>" if rows else ""
    body = ""
    if "requestBody" in op:
        content = op["requestBody"].get("content", {})
        body = "<p>body: " + ", ".join(f"<code>{escape(kind)}</code> {_type(c.get('schema', {}))}"
                                        for kind, c in content.items()) + "</p>"
    responses = "".join(
        f"<tr><td>{escape(str(status))}</td><td>{escape(r.get('description', ''))}</td><td>"
        + ", ".join(f"<code>{escape(kind)}</code> {_type(c.get('schema', {}))}" for kind, c in
                    r.get("content", {}).items()) + "</td></tr>"
        for status, r in op.get("responses", {}).items())
    security = " · needs <code>Authorization: Bearer &lt;secret&gt;</code>" if op.get("security") else ""
    return (f"<div class='op' id='{escape(method)}-{escape(path)}'><p><span class='method {escape(method)}'>"
            f"{escape(method.upper())}</span> <code>{escape(path)}</code> {escape(op.get('summary', ''))}{security}</p>"
            f"<p>{escape(op.get('description', ''))}</p>{params}{body}"
            f"<table><tr><th>status</th><th>meaning</th><th>body</th></tr>{responses}</table></div>")


def _component(name: str, body: dict[str, Any]) -> str:
    required = set(body.get("required", []))
    rows = "".join(
        f"<tr><td><code>{escape(field)}</code></td><td>{'required' if field in required else 'optional'}</td>"
        f"<td>{_type(spec)}</td><td>{escape(spec.get('description', ''))}{_limits(spec)}</td></tr>"
        for field, spec in body.get("properties", {}).items())
    table = (f"<table><tr><th>field</th><th></th><th>type</th><th></th></tr>{rows}</table>" if rows else
             f"<pre>{escape(json.dumps(body, indent=2))}</pre>")
    return (f"<div class='op' id='schema-{escape(name)}'><h3>{escape(name)}</h3>"
            f"<p>{escape(body.get('description', ''))}</p>{table}</div>")


def _type(spec: dict[str, Any]) -> str:
    """A schema's type in a few words, with links to named schemas."""
    if "$ref" in spec:
        name = spec["$ref"].rsplit("/", 1)[-1]
        return f"<a href='#schema-{escape(name)}'>{escape(name)}</a>"
    for key in ("anyOf", "oneOf", "allOf"):
        if key in spec:
            return " | ".join(_type(s) for s in spec[key])
    kind = spec.get("type", "any")
    if kind == "array":
        return f"array of {_type(spec.get('items', {}))}"
    if "enum" in spec:
        return escape(" | ".join(json.dumps(v) for v in spec["enum"]))
    if "const" in spec:
        return escape(json.dumps(spec["const"]))
    if kind == "object" and isinstance(spec.get("additionalProperties"), dict):
        return f"object of {_type(spec['additionalProperties'])}"
    return escape(str(kind))


def _limits(spec: dict[str, Any]) -> str:
    keys = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
            "default")
    found = [f"{k} {json.dumps(spec[k])}" for k in keys if k in spec]
    return f" <small>({escape(', '.join(found))})</small>" if found else ""
