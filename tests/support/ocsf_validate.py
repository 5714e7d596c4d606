"""Validate OCSF events (one JSON object a line on stdin) against the OCSF 1.7.0 schema,
offline, twice:

1. The official 1.7.0 export (what schema.ocsf.io serves as `/1.7.0/export/schema`: every
   class with its profiles' attributes and their enums), as PyPI `ocsf-json-schema` 1.2.0
   ships it (checked by its SHA-256 below). The event's class, with the profiles it declares
   in `metadata.profiles`, becomes a JSON Schema (that package's generator: types, required
   attributes, enums, no attribute the schema does not define, objects inside included),
   validated with PyPI `jsonschema`; then every `*_id` with a sibling is checked against the
   export's captions, and an `Other` (99) whose sibling names one of the enum's own values is
   refused (the event must use that value: a SIEM rule on the id misses it otherwise).
2. The pydantic model of its class from PyPI `pydantic-ocsf` (required attributes, types,
   enum values of the class, category/class/type uids, sibling captions). The models accept
   unknown attributes (`extra="allow"`), so this script also refuses any attribute the class
   or object does not define, except the attributes of the profiles Airlock declares (the
   package leaves profiles out), which it checks against its dictionary and object models.
   Its dictionary's `action_id` enum is the base one (0, 1, 2, 99): the security-control
   profile's values (3 Observed, 4 Modified) are in the export only.

Prints `ok <class_uid> <uid>` per valid event; exits 1 naming every problem otherwise.
"""

import hashlib
import importlib.resources
import json
import sys

try:
    import jsonschema
    from ocsf_json_schema import OcsfJsonSchemaEmbedded
    from pydantic import BaseModel, ValidationError
except ImportError as e:
    sys.exit(f"{e}: run `cargo xtask setup` (target/test-venv-ocsf needs pydantic-ocsf, ocsf-json-schema and jsonschema)")

from ocsf._schema_loader import get_schema_loader  # noqa: F401 (the schema's presence)
from ocsf.v1_7_0 import events, objects

CLASSES = {
    2004: events.DetectionFinding,
    3004: events.EntityManagement,
    4001: events.NetworkActivity,
    6002: events.ApplicationLifecycle,
    6003: events.ApiActivity,
}

# Attributes the profiles add to a class (OCSF 1.7.0 `security_control` and `host`).
PROFILE_ATTRIBUTES = {
    "security_control": {
        "action": str,
        "action_id": int,
        "disposition": str,
        "disposition_id": int,
        "policy": objects.Policy,
        "is_alert": bool,
    },
    "host": {"device": objects.Device, "actor": objects.Actor},
}


def schema_dictionary():
    import importlib.resources

    path = importlib.resources.files("ocsf") / "schemas" / "v1_7_0.json"
    return json.loads(path.read_text())["dictionary"]["attributes"]


DICTIONARY = schema_dictionary()


# The official export of OCSF 1.7.0, as `ocsf-json-schema` 1.2.0 ships it.
EXPORT_SHA256 = "462ae9096319e24ce5385e8aa692c89fed509f89d1dc5ee7db8e83fb901123ae"


def official_export():
    path = importlib.resources.files("ocsf_json_schema") / "ocsf" / "1.7.0.json"
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != EXPORT_SHA256:
        sys.exit(f"{path}: SHA-256 {digest}, not the OCSF 1.7.0 export this script was checked with")
    export = json.loads(raw)
    assert export["version"] == "1.7.0", export["version"]
    return export


EXPORT = official_export()
EXPORT_CLASSES = {c["uid"]: c for c in EXPORT["classes"].values()}
GENERATOR = OcsfJsonSchemaEmbedded(EXPORT)
JSON_SCHEMAS = {}


def export_problems(event):
    """Problems of `event` against the official export, with the profiles it declares."""
    cls = EXPORT_CLASSES.get(event.get("class_uid"))
    if cls is None:
        return [f"class_uid {event.get('class_uid')} is not a class of the OCSF 1.7.0 export"]
    profiles = tuple(event.get("metadata", {}).get("profiles", []))
    unknown = [p for p in profiles if p not in cls.get("profiles", [])]
    if unknown:
        return [f"profiles {unknown} do not apply to class {cls['name']} in the export"]
    key = (cls["name"], profiles)
    if key not in JSON_SCHEMAS:
        schema = GENERATOR.get_class_schema(class_name=cls["name"], profiles=list(profiles))
        JSON_SCHEMAS[key] = jsonschema.Draft202012Validator(schema)
    problems = [
        f"export ({cls['name']} with {list(profiles)}): {'.'.join(map(str, e.absolute_path)) or '(event)'}: {e.message}"
        for e in JSON_SCHEMAS[key].iter_errors(event)
    ]
    attributes = cls["attributes"]
    for id_key, attr in attributes.items():
        sibling = attr.get("sibling")
        if id_key not in event or not sibling or "enum" not in attr:
            continue
        if attr.get("profile") and attr["profile"] not in profiles:
            continue
        enum = attr["enum"]
        value = str(event[id_key])
        if value not in enum:
            continue  # reported by the JSON Schema
        caption = enum[value]["caption"]
        text = event.get(sibling)
        if value != "99":
            if text is not None and text != caption:
                problems.append(f"export: {sibling}={text!r} is not the caption of {id_key}={value} ({caption!r})")
        elif text is not None:
            named = [k for k, v in enum.items() if k != "99" and v["caption"].lower() == str(text).lower()]
            if named:
                problems.append(
                    f"export: {id_key}=99 (Other) with {sibling}={text!r}, which is {id_key}={named[0]} in the schema"
                )
    return problems


def extras(model, path):
    """Every attribute a validated model (and the models inside it) does not define."""
    found = []
    for key in model.model_extra or {}:
        found.append(f"{path}.{key}")
    for name in type(model).model_fields:
        if name == "unmapped":
            continue  # OCSF's place for source attributes it does not define
        value = getattr(model, name, None)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                sub = f"{path}.{name}" + (f"[{i}]" if isinstance(value, list) else "")
                found.extend(extras(item, sub))
    return found


def check_enum(name, event, problems):
    """`name`_id must be in the dictionary's enum; its sibling caption must match (unless 99).
    A profile may add values to the dictionary's enum (security_control adds `action_id` 3
    and 4): those come from the export, which has the profiles `pydantic-ocsf` leaves out."""
    id_key = f"{name}_id"
    if id_key not in event:
        return
    enum = dict(DICTIONARY[id_key]["enum"])
    attr = EXPORT_CLASSES.get(event.get("class_uid"), {}).get("attributes", {}).get(id_key, {})
    if attr.get("profile") in event.get("metadata", {}).get("profiles", []):
        enum.update(attr.get("enum", {}))
    value = event[id_key]
    if str(value) not in enum:
        problems.append(f"{id_key}={value} is not in the schema's enum {sorted(enum, key=int)}")
        return
    caption = enum[str(value)]["caption"]
    if name in event and value != 99 and event[name] != caption:
        problems.append(f"{name}={event[name]!r} does not match {id_key}={value} ({caption!r})")


def validate(event):
    return export_problems(event) + pydantic_problems(event)


def pydantic_problems(event):
    problems = []
    cls = CLASSES.get(event.get("class_uid"))
    if cls is None:
        return [f"class_uid {event.get('class_uid')} is not one Airlock emits"]
    profiles = event.get("metadata", {}).get("profiles", [])
    allowed = {}
    for p in profiles:
        if p not in PROFILE_ATTRIBUTES:
            problems.append(f"unknown profile {p}")
            continue
        allowed.update(PROFILE_ATTRIBUTES[p])
    core = {k: v for k, v in event.items() if k not in allowed or k in cls.model_fields}
    try:
        model = cls.model_validate(core)
    except ValidationError as e:
        return problems + [f"{cls.__name__}: {e}"]
    problems += [f"attribute {x} is not defined by the schema" for x in extras(model, "event")]
    for key, kind in allowed.items():
        if key not in event or key in cls.model_fields:
            continue
        value = event[key]
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            try:
                sub = kind.model_validate(value)
                problems += [f"attribute {x} is not defined by the schema" for x in extras(sub, key)]
            except ValidationError as e:
                problems.append(f"{key}: {e}")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            problems.append(f"{key} must be {kind.__name__}, got {value!r}")
    check_enum("action", event, problems)
    check_enum("disposition", event, problems)
    check_enum("severity", event, problems)
    meta = event.get("metadata", {})
    if meta.get("version") != "1.7.0":
        problems.append(f"metadata.version is {meta.get('version')!r}, not 1.7.0")
    if not isinstance(event.get("time"), int) or event["time"] < 10**12:
        problems.append("time must be milliseconds since the epoch")
    return problems


def main():
    failed = 0
    count = 0
    for n, line in enumerate(sys.stdin, 1):
        line = line.strip()
        if not line:
            continue
        count += 1
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            print(f"line {n}: not JSON: {e}")
            failed += 1
            continue
        problems = validate(event)
        if problems:
            failed += 1
            for p in problems:
                print(f"line {n} (class {event.get('class_uid')}): {p}")
        else:
            print(f"ok {event['class_uid']} {event.get('metadata', {}).get('uid')}")
    if count == 0:
        print("no events on stdin")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
