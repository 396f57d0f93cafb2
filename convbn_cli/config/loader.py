"""Read a YAML config, apply command-line overrides, validate, and explain every problem in one line.

Errors name the dotted path of the offending key (`model.layers[2].bn.decay: must be in [0, 1), got 1.5`)
so that a user can find it in the file. TensorFlow is never imported here: `convbn validate` and
`convbn --help` stay fast.
"""

from __future__ import annotations

import difflib
import functools
import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from ..data import registry
from ..errors import ConfigError, ConvbnError
from ..readers import read_bytes
from . import builtin, schema
from .plan import plan_layers, unused_renorm_keys

MAX_CONFIG_BYTES = 1 << 20  # 1 MiB; the shipped configs are under 1 KB
MAX_NESTING = 32  # mappings and lists inside each other (a config needs 4)
MAX_PROBLEMS = 20  # listed one per line; the rest are counted


# --------------------------------------------------------------------------- YAML and overrides

# libyaml's parser when PyYAML has it (the pure-Python one takes seconds for a large file)
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):
    """yaml.SafeLoader (no Python tags) that refuses a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one",
                        key_node.start_mark)
                seen[key] = line
            except TypeError:  # an unhashable key (a list as a key): the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)

    def refuse_tag(self, node):
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.tag.rsplit(':', 1)[-1]!r} values (tag {node.tag}) are not allowed: a config holds "
            "text, numbers, booleans, lists and mappings", node.start_mark)


# what YAML would make a date, bytes, a set or ordered pairs of stays out of a config: every reader of config.yaml
# (the schema, `convbn runs`, JSON output) expects plain data; an unquoted 2024-01-01 stays the text it looks like
for _tag in ("timestamp", "binary", "set", "omap", "pairs"):
    _UniqueKeyLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _UniqueKeyLoader.refuse_tag)
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in _SafeLoader.yaml_implicit_resolvers.items()}


def safe_parse(text):
    """YAML text -> Python data, with no Python tags, no duplicate keys and bounded nesting.

    The nesting is checked on PyYAML's event stream, which is iterative, before its recursive constructor runs:
    a 20,000-deep list would otherwise end in a RecursionError. Raises yaml.YAMLError.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise yaml.YAMLError(f"line {event.start_mark.line + 1}: nested more than {MAX_NESTING} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)


def read_yaml(path) -> dict:
    """Parse a config file (at most MAX_CONFIG_BYTES, see safe_parse), insisting on a mapping at the top."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        raise ConfigError([f"{path}: no such file (built-in configs: {', '.join(builtin.builtin_names())})"])
    try:  # bounded, and never a FIFO or a device: `convbn validate /dev/zero` must not read forever
        text = read_bytes(path, MAX_CONFIG_BYTES, "a convbn config")
    except ConvbnError as e:
        raise ConfigError([str(e)]) from None
    return parse_config_text(text, path)


def parse_config_text(text, where, empty="empty file") -> dict:
    """A config's YAML text (a file's, or the copy a sweep keeps of each run's) -> its mapping, through safe_parse;
    a problem is one ConfigError line naming `where`."""
    try:
        raw = safe_parse(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{where}: not valid YAML: {_yaml_problem(e)}"]) from None
    if raw is None:
        raise ConfigError([f"{where}: {empty}; expected a mapping with at least a `model:` section"])
    if not isinstance(raw, dict):
        raise ConfigError([f"{where}: the top level must be a mapping, got {_type_name(raw)}"])
    return raw


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())  # one line, whatever PyYAML put in it


_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[(-?\d+)\]")


def parse_key(key: str) -> list:
    """`model.layers[0].filters` -> ['model', 'layers', 0, 'filters']."""
    parts, pos = [], 0
    while pos < len(key):
        if parts and key[pos] == ".":
            pos += 1
        m = _TOKEN.match(key, pos)
        if not m:
            raise ValueError(f"cannot parse key {key!r} at position {pos}")
        parts.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
        pos = m.end()
    if not parts:
        raise ValueError("empty key")
    return parts


def apply_overrides(raw: dict, overrides) -> dict:
    """Set `key=value` pairs in the raw config; values are YAML scalars (`0.9`, `true`, `[3, 3]`, `null`)."""
    problems, given = [], set()  # given: every key the overrides set, nested ones included
    names = {section: _choice_name(raw, section) for section in schema.NAMED_CHOICES}  # the file's, before them
    unused = _unused_renorm(raw) if overrides else None  # the file's renorm keys nothing used before them
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=1")
            continue
        try:
            parts = parse_key(key.strip())
            value = safe_parse(text) if text.strip() else None
        except ValueError as e:
            problems.append(f"override {item!r}: {e}")
            continue
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: value is not valid YAML: {_yaml_problem(e)}")
            continue
        node, where = raw, []  # where: the key's path with list positions counted from 0 (layers[-1]: its number)
        for depth, part in enumerate(parts[:-1]):
            nxt = parts[depth + 1]
            where.append(part % len(node) if isinstance(part, int) and isinstance(node, list) and node else part)
            node, err = _step(node, part, create={} if isinstance(nxt, str) else None)
            if err:
                problems.append(f"override {item!r}: {format_loc(parts[:depth + 1])}: {err}")
                break
        else:
            last = parts[-1]
            if isinstance(last, int):
                if not isinstance(node, list) or not -len(node) <= last < len(node):
                    problems.append(f"override {item!r}: {format_loc(parts)}: no such list item")
                    continue
            elif not isinstance(node, dict):
                problems.append(f"override {item!r}: {format_loc(parts[:-1])}: is not a mapping")
                continue
            node[last] = value
            where.append(last % len(node) if isinstance(last, int) else last)
            given.update(_paths(tuple(where), value))
    if problems:
        raise ConfigError(problems)
    _switch_choices(raw, names, given)
    if unused is not None and any(path[0] == "model" for path in given):
        # renorm turned off by an override (or its layers removed): the file's keys for it go; not those unused in
        # the file already, nor those an override set: they stay errors (a file that does not validate: none go)
        for path in set(_unused_renorm(raw) or ()) - set(unused) - given:
            _drop(raw, path)
    return raw


def _paths(prefix: tuple, value):
    """The key `prefix` and every key under it in `value` (an override may set a whole mapping)."""
    yield prefix
    for key, inner in (value.items() if isinstance(value, dict) else ()):
        yield from _paths((*prefix, key), inner)


def _choice_section(raw: dict, section: str) -> dict | None:
    train = raw.get("train")
    node = train.get(section) if isinstance(train, dict) else None
    return node if isinstance(node, dict) else None


def _choice_name(raw: dict, section: str):
    node, default = _choice_section(raw, section), schema.NAMED_CHOICES[section].model_fields["name"].default
    return default if node is None else node.get("name", default)


def _switch_choices(raw: dict, names: dict, given: set) -> None:
    """`train.optimizer.name=sgd` on a config written for adam: the file's keys that only other optimizers take (its
    betas) go, as the user switched optimizer (the same for train.schedule); a key an override set stays, to be
    checked like any other. Against the file's name (`names`): naming it again, or back, switches nothing."""
    for section, choice in schema.NAMED_CHOICES.items():
        node, name = _choice_section(raw, section), _choice_name(raw, section)
        if node is not None and isinstance(name, str) and name in choice.OWN_KEYS and name != names[section]:
            for key in choice.unused_keys(name):
                if ("train", section, key) not in given:
                    node.pop(key, None)


def as_trained(config: dict) -> dict:
    """A config convbn wrote (a run's config.yaml, a sweep's plan) as its run trained, in place: until convbn
    checked them, it wrote every optimizer and schedule key, used or not, and BN's renorm keys; those unused go.
    Until train.precise_bn.augmented, precise BN calibrated on augmented images: a precise_bn without it says so."""
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    if isinstance(train.get("precise_bn"), dict):
        train["precise_bn"].setdefault("augmented", True)
    # (an older run with train.ema and precise BN off recomputed its EMA's statistics on augmented images too, but
    # its `precise_bn: null` is what convbn writes today: nothing tells it apart, and it resumes unaugmented)
    for section, choice in schema.NAMED_CHOICES.items():
        node = _choice_section(config, section)
        if node is not None:
            for unused in choice.unused_keys(_choice_name(config, section)):
                node.pop(unused, None)
    for path in _unused_renorm(config) or ():
        _drop(config, path)
    return config


def _unused_renorm(config: dict) -> list | None:
    """unused_renorm_keys of a raw config's model; None where the model is not valid (the validation that follows
    reports its problems, with every other)."""
    try:
        return unused_renorm_keys(schema.ModelConfig.model_validate(config.get("model")))
    except ValidationError:
        return None


def _in_a_run(path) -> bool:
    """Whether a config file is a run directory's config.yaml (run.json beside it: runs/rundir.py's layout), which
    convbn wrote: `convbn train runs/x/1/config.yaml` starts a new run from an old one's config."""
    path = Path(path)
    return path.name == "config.yaml" and (path.parent / "run.json").is_file()


def _step(node, part, create):
    if isinstance(part, int):
        if not isinstance(node, list):
            return None, "is not a list"
        if not -len(node) <= part < len(node):
            return None, f"no such list item (the list has {len(node)})"
        return node[part], None
    if not isinstance(node, dict):
        return None, "is not a mapping"
    if part not in node or node[part] is None:
        if create is None:
            return None, "no such list"
        node[part] = create
    return node[part], None


class _FlowListDumper(yaml.SafeDumper):
    """Short lists of numbers on one line (`kernel: [5, 5]`), everything else in block style."""


_FlowListDumper.add_representer(
    list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v,
                                            flow_style=all(isinstance(i, (int, float)) for i in v)))


def dump_config(cfg) -> str:
    """The resolved config as YAML (every default filled in; of the optimizer's and the schedule's keys, and of
    BN's renorm keys, those used): what validate prints and runs record."""
    data = cfg.model_dump(mode="json")
    for path in unused_renorm_keys(cfg.model):
        _drop(data, path)
    return yaml.dump(data, Dumper=_FlowListDumper, sort_keys=False)


def _drop(config: dict, path: tuple) -> None:
    """Remove the key at `path` (from unused_renorm_keys) where it is; a layer's `bn:` left empty is `bn: true`."""
    node = config
    for part in path[:-1]:
        if isinstance(part, str) and not (isinstance(node, dict) and part in node):
            return
        if isinstance(part, int) and not (isinstance(node, list) and 0 <= part < len(node)):
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(path[-1], None)
        if not node and path[-2] == "bn" and path[1] == "layers":
            config["model"]["layers"][path[2]]["bn"] = True


# --------------------------------------------------------------------------- validation

def load_config(path=None, overrides=(), *, raw: dict | None = None, log=None, progress: bool = True,
                on_dataset=None, read_dataset: bool = True, reread: bool | None = None,
                written_by_convbn: bool | None = None) -> schema.Config:
    """Load, override and validate a config; raise ConfigError listing every problem.

    `raw` takes an already parsed mapping instead of a file. Shape checks that can be made before
    training (kernels larger than their input, dense layers fed 4-D tensors, ...) run here too. A config naming
    the user's own dataset reads it first (from convbn's cache, or decoding it with `progress`, saying so to
    `log`), since its classes and image shape are part of the config (data.about); `on_dataset(own, cfg)` then sees
    what was read. `read_dataset=False`: the config as written, the user's dataset not read (nor the layers
    planned, which need its classes and shape: `convbn configs` lists the built-in configs so). `reread` (the
    default for a config file, not for `raw`): what a config says it read of the user's dataset (data.about, as a
    run's config.yaml has it) is set aside and the dataset read as it is now: a new run from an old run's config
    trains on today's files. A run's own config keeps it (RunDir.load_config: reread=False), so that commands
    measuring the run refuse a dataset that changed since. `written_by_convbn`: a config convbn wrote, read as its
    run trained (as_trained) before the overrides; None (the default): True for a config.yaml with run.json beside
    it, a run's own.
    """
    if raw is None:
        path = builtin.resolve(path)  # a file, or the name of a config that ships with convbn (`mnist_bn`)
        raw = read_yaml(path)
    if written_by_convbn or (written_by_convbn is None and path is not None and _in_a_run(path)):
        as_trained(raw)
    raw = apply_overrides(raw, overrides)
    if (path is not None if reread is None else reread) and isinstance(raw.get("data"), dict):
        raw["data"].pop("about", None)
    out = raw.setdefault("output", {})
    if isinstance(out, dict) and out.get("name") is None and path is not None:
        out["name"] = _safe_name(Path(path).stem)
    cfg = _validate(raw)
    if not cfg.resolved:
        if not read_dataset:
            return cfg
        cfg = _read_own_dataset(cfg, raw, log, progress, on_dataset)
    plan_layers(cfg)  # raises ConfigError on shape problems
    return cfg


def _validate(raw: dict) -> schema.Config:
    try:
        return schema.Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def _read_own_dataset(cfg, raw: dict, log, progress: bool, on_dataset) -> schema.Config:
    """The config with data.about filled from the user's dataset, and its path made absolute, so that the run's
    config.yaml names it from anywhere."""
    from ..data.own.dataset import for_config, stderr_log  # NumPy and Pillow: only for a config that needs them

    path = Path(cfg.own.path).expanduser()
    if not path.exists() and not path.is_symlink():
        builtin_names = " or ".join(registry.DATASETS)
        raise ConfigError([f"data.dataset: {cfg.own.path!r} is neither a built-in dataset ({builtin_names}) nor a "
                           "file or folder of your own"])
    own = for_config(cfg, log=log or stderr_log, progress=progress)
    raw = {**raw, "data": {**raw["data"], "dataset": {"path": str(own.root), "format": own.format},
                           "about": own.about()}}
    if on_dataset is not None:
        on_dataset(own, cfg)
    return _validate(raw)


def _safe_name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "run"
    return name[:128]


def format_loc(loc) -> str:
    """('model', 'layers', 2, 'bn') -> model.layers[2].bn; a key that is no identifier is quoted: data['a b']."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)):
            out += f"[{str(part)!r}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _clean_loc(loc):
    """Drop the discriminator tags pydantic adds after a layer index (`layers[2].conv.bn` -> `layers[2].bn`)."""
    out = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and i >= 2 and isinstance(loc[i - 1], int) and loc[i - 2] == "layers" \
                and part in schema.LAYER_CLASSES:
            continue
        out.append(part)
    return out


def _type_name(v) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _got(v) -> str:
    if isinstance(v, (dict, list)):
        return _type_name(v)
    if isinstance(v, str):
        return repr(v if len(v) <= 40 else v[:37] + "...")
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    return str(v)


def _model_at(loc):
    """The pydantic model class found at `loc` (for listing the keys it accepts); None if unknown."""
    cls = schema.Config
    for i, part in enumerate(loc):
        if isinstance(part, int):
            continue  # a list item: its type was taken at the list's key
        if i >= 1 and isinstance(loc[i - 1], int) and part in schema.LAYER_CLASSES:
            cls = schema.LAYER_CLASSES[part]  # pydantic's discriminator tag tells which layer class
            continue
        field = cls.model_fields.get(part) if cls is not None else None
        if field is None:
            return None
        cls = _model_in(field.annotation)
    return cls


def _model_in(tp):
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(e: ValidationError) -> list[str]:
    """One line per problem (the first MAX_PROBLEMS of them, then a count), each naming its dotted key."""
    lines = {}  # a dict keeps the order and makes the duplicate check O(1): 64,000 unknown keys stay fast
    errors = e.errors(include_url=False)
    for err in errors:
        line = _problem_line(err)
        if line not in lines:
            lines[line] = None
            if len(lines) == MAX_PROBLEMS:
                break
    out = list(lines)
    if len(errors) > len(out) and len(out) == MAX_PROBLEMS:
        out.append(f"... and more problems ({len(errors)} in all); fix these first")
    return out


def _did_you_mean(word, options) -> str:
    """"; did you mean epochs?" for a near miss (a typo, a missing letter), else nothing (difflib's ratio)."""
    if not isinstance(word, str) or not options:
        return ""
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _unknown_key(raw_loc, loc, value=None) -> str:
    """"unknown key", with the near miss among its neighbours, or else the full dotted key(s) it is the last part of
    (`epochs=2` -> train.epochs, as other tools take bare names), and the keys accepted where it was given; in a BN
    section, what Keras' or PyTorch's name for a setting is here (before any near miss: `momentum` is not
    renorm_momentum)."""
    holder = _model_at(raw_loc[:-1])
    known = [k for k in holder.model_fields] if holder is not None else []
    word = loc[-1] if loc else ""
    if holder in (schema.BNSettings, schema.BNOverride) and word in _FOREIGN_BN:
        return f"unknown key; {_FOREIGN_BN[word](value)}"
    hint = _did_you_mean(word, known)
    if not hint and isinstance(word, str):
        here = format_loc(loc)
        full = [k for k in _full_keys(_LEAF_ALIASES.get(word, word)) if k != here]
        hint = f"; did you mean {' or '.join(full)}?" if full else ""
    return "unknown key" + hint + (f" (expected one of: {', '.join(known)})" if known else "")


def _momentum(value) -> str:
    # Keras' momentum is the old statistics' weight (decay itself), PyTorch's the new batch's (1 - decay): a value
    # below a half can only be PyTorch's (a decay under 0.5 forgets the statistics within a couple of steps)
    said = ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1:
        whose, decay = ("PyTorch's", 1 - value) if value < 0.5 else ("Keras'", value)
        shown = f"{decay:.12g}"  # short, but never rounded up to "1", which decay refuses
        said = f"; {value!r} reads as {whose}: write decay: {shown if float(shown) < 1 else repr(decay)}"
    return ("convbn calls the moving statistics' update weight decay (TF1's name): Keras' momentum is the same "
            f"number (0.99 is decay: 0.99), PyTorch's is 1 - decay (0.1 is decay: 0.9){said}")


# BN settings by the names Keras, PyTorch or TF1 give them: what each is in convbn (value -> advice)
_FOREIGN_BN = {
    "momentum": _momentum,
    "affine": lambda v: "PyTorch's affine: false is center: false and scale: false here (no beta, no gamma)",
    "track_running_stats": lambda v: "convbn always keeps the moving statistics and normalizes with them at "
                                     "inference (PyTorch's track_running_stats: true); there is no switch",
    "axis": lambda v: "BN normalizes each channel over the batch and the image (height, width); the channel axis "
                      "follows model.data_format",
    "fused": lambda v: "write impl: fused (TensorFlow's fused kernel), keras or auto",
    "synchronized": lambda v: "synchronized BN across replicas is distribute.sync_bn",
}

# what other tools call a setting convbn names otherwise (Ultralytics' `batch` and `lr0`, Keras' `learning_rate`)
_LEAF_ALIASES = {"batch": "batch_size", "lr0": "lr", "learning_rate": "lr"}


def _full_keys(word: str, most: int = 3) -> list:
    """The dotted keys whose last part is `word`, or else close to it (a typo): at most `most`."""
    index = _leaf_index()
    names = [word] if word in index else difflib.get_close_matches(word, list(index), n=most, cutoff=0.75)
    return [k for name in names for k in index[name]][:most]


@functools.lru_cache(maxsize=1)
def _leaf_index() -> dict:
    """{last part: [dotted keys]} over the config's settings (not the per-layer ones, which sit in a list)."""
    index = {}

    def walk(cls, prefix):
        for name, field in cls.model_fields.items():
            if name == "layers":
                continue
            inner = _model_in(field.annotation)
            if inner is not None:
                walk(inner, f"{prefix}{name}.")
            index.setdefault(name, []).append(prefix + name)

    walk(schema.Config, "")
    return index


def _problem_line(err) -> str:
    loc = _clean_loc(err["loc"])
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        msg = _unknown_key(err["loc"], loc, err.get("input"))
    elif kind == "missing":
        msg = "required key missing"
    elif kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
    elif kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        msg = f"must be one of {ctx.get('expected')}, got {_got(value)}" + _did_you_mean(value, options)
    elif kind == "union_tag_invalid":
        loc = loc + ["type"]
        msg = (f"unknown layer type {_got(ctx.get('tag'))}" + _did_you_mean(ctx.get("tag"), schema.LAYER_CLASSES)
               + f" (expected one of: {', '.join(schema.LAYER_CLASSES)})")
    elif kind == "union_tag_not_found":
        loc = loc + ["type"]
        msg = f"required key missing (one of: {', '.join(schema.LAYER_CLASSES)})"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        msg = f"must be a mapping, got {_got(value)}"
    elif kind == "list_type" and loc and loc[-1] in _PAIR_KEYS:
        msg = f"must be an integer or a list of 2 integers, got {_got(value)}"
    elif kind == "list_type":
        msg = f"must be a list, got {_got(value)}"
    elif kind in ("int_type", "int_from_float"):
        msg = f"must be an integer, got {_got(value)}"
    elif kind == "float_type":
        msg = f"must be a number, got {_got(value)}"
    elif kind == "bool_type":
        msg = f"must be true or false, got {_got(value)}"
    elif kind == "string_type":
        msg = f"must be a string, got {_got(value)}"
    elif kind == "string_pattern_mismatch":
        msg = f"may contain only letters, digits, '.', '_' and '-', got {_got(value)}"
    elif kind in ("too_short", "too_long"):
        lo, hi, n = ctx.get("min_length"), ctx.get("max_length"), ctx.get("actual_length")
        if loc and loc[-1] in _PAIR_KEYS:
            msg = f"must be an integer or a list of 2 integers, got {n} item{'' if n == 1 else 's'}"
        elif kind == "too_short" and not hi:
            msg = f"must have at least {lo} item(s)"
        else:
            msg = f"must have {'at least %s' % lo if kind == 'too_short' else 'at most %s' % hi} items, got {n}"
    else:  # anything else: pydantic's own words, on one line
        msg = " ".join(err["msg"].split())
    if len(loc) >= 2 and isinstance(loc[-1], int) and loc[-2] in _PAIR_KEYS:
        loc = loc[:-1]  # `stride: 0` was expanded to [0, 0]; report it once, at the key
    return f"{format_loc(loc)}: {msg}"


_PAIR_KEYS = ("kernel", "stride", "dilation", "size", "border")  # schema.IntPair's keys
