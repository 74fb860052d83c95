"""``--authz-policy``: which mTLS callers may call which methods, and meter what.

A YAML file in, a :class:`Policy` out, or one :class:`ConfigError` line naming the
file, the line and the place; then :meth:`Policy.check` decides each call and refuses
with CALLER_NOT_ALLOWED. Strict on purpose: a typo in a policy must stop start-up,
not refuse (or allow) a caller in production. The format is in docs/authorization.md.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.config import ConfigError
from gateway.domain import validation
from gateway.domain.errors import GatewayError, Reason
from marketplace.metering.v1 import metering_pb2 as pb

ANY = "*"  # an identity, a product or the dimensions: anything
REASON = Reason.CALLER_NOT_ALLOWED

# "package.Service" → its methods' full names ("package.Service/Method"), from the proto itself.
SERVICES: Mapping[str, frozenset[str]] = {
    s.full_name: frozenset(f"{s.full_name}/{m.name}" for m in s.methods)
    for s in pb.DESCRIPTOR.services_by_name.values()
}
METHODS = frozenset().union(*SERVICES.values())

_CALLER_KEYS = ("identity", "methods", "products")
_NULL = "tag:yaml.org,2002:null"


@dataclass(frozen=True)
class Grant:
    """What one identity may do: ``products`` maps a code (or ``*``) to its dimensions, None for any."""

    methods: frozenset[str]
    products: Mapping[str, frozenset[str] | None]

    def merged(self, other: Grant) -> Grant:
        """Both grants' rights: an identity's own entry plus the ``*`` entry."""
        products = dict(self.products)
        for code, dims in other.products.items():
            mine = products.get(code, frozenset())
            products[code] = None if mine is None or dims is None else mine | dims
        return Grant(self.methods | other.methods, products)

    def refused_part(self, product: str, dimension: str) -> str | None:
        """None when ``product``/``dimension`` may be metered; else which part is refused."""
        if product not in self.products and ANY not in self.products:
            return "product"
        for code in (product, ANY):
            if code in self.products:
                dims = self.products[code]
                if dims is None or dimension in dims:
                    return None
        return "dimension"


@dataclass(frozen=True)
class Policy:
    """A loaded policy: identity → :class:`Grant` (each already including the ``*`` entry's rights)."""

    grants: Mapping[str, Grant]

    def check(self, identity: str | None, method: str, request: object) -> None:
        """Return if ``identity`` may call ``method`` with ``request``; else raise CALLER_NOT_ALLOWED.
        The interceptor's ``authorize`` hook, with the identity it read from the certificate.

        A metering request is checked for every (product, dimension) it meters, and a
        RecordUsage batch is refused whole, naming its first refused event.
        """
        name = method.lstrip("/")  # gRPC's "/package.Service/Method" as the policy writes it
        if identity is None:
            raise _refusal(
                "",
                name,
                "the caller's client certificate has no URI or DNS subject alternative name, "
                "so the authorization policy allows it nothing",
            )
        grant = self.grants.get(identity) or self.grants.get(ANY)
        if grant is None:
            raise _refusal(
                identity, name, f"caller {identity} may not call {name}: the authorization policy does not list it"
            )
        if name not in grant.methods:
            raise _refusal(identity, name, f"caller {identity} may not call {name}")
        for path, product, dimension in metered(request):
            part = grant.refused_part(product, dimension)
            if part is None:
                continue
            at = f" ({path.rstrip('.')}); nothing in the batch was recorded" if path else ""
            if part == "product" and not product:  # usage of a license: AWS, not the request, knows its product
                raise _refusal(
                    identity,
                    name,
                    f"caller {identity} may meter only some products, and usage of a license names none the "
                    f"gateway can check{at}",
                    field=f"{path}license_arn",
                )
            if part == "product":
                raise _refusal(
                    identity,
                    name,
                    f"caller {identity} may not meter product {product}{at}",
                    productCode=product,
                    field=f"{path}product_code",
                )
            raise _refusal(
                identity,
                name,
                f"caller {identity} may not meter dimension {dimension} of product {product}{at}",
                usageDimension=dimension,
                field=f"{path}usage_dimension",
            )


def metered(request: object) -> Iterator[tuple[str, str, str]]:
    """(field path prefix, product code, dimension) for each thing a request meters; none for
    other calls. Usage of a license has no product code here (""): the license decides
    what AWS bills, whatever product an event names, so only a grant of every product
    covers it."""
    if isinstance(request, pb.MeterUsageRequest):
        yield "", request.product_code, request.usage_dimension
    elif isinstance(request, pb.RecordUsageRequest):
        for i, event in enumerate(request.events):
            product = "" if _by_license(event) else event.product_code
            yield f"events[{i}].", product, event.usage_dimension
    elif isinstance(request, pb.BatchMeterUsageRequest):
        for i, record in enumerate(request.usage_records):
            product = "" if _by_license(record) else request.product_code
            yield f"usage_records[{i}].", product, record.dimension


def _by_license(usage: pb.UsageEvent | pb.UsageRecord) -> bool:
    """Whether usage names its customer by account and license (validation's one rule of it)."""
    way = validation.customer_way(usage.customer_aws_account_id, usage.license_arn, usage.customer_identifier)
    return way == validation.ACCOUNT


def _refusal(identity: str, method: str, message: str, **metadata: str) -> GatewayError:
    return GatewayError(REASON, message, extra_metadata={"callerIdentity": identity, "method": method, **metadata})


# Loading. Walks yaml's node tree rather than the constructed values, so every
# problem has a line, duplicate keys are seen, and text stays as written (0123, yes).


class _Problem(Exception):
    def __init__(self, node: yaml.Node, where: str, problem: str) -> None:
        super().__init__(problem)
        self.line = node.start_mark.line + 1
        self.where = where
        self.problem = problem


def load_policy(path: str) -> Policy:
    """The policy in the file at ``path``, or ConfigError (one line) saying what is wrong and where."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"authz-policy {path}: cannot read it: {exc}") from None
    return parse_policy(text, path)


def parse_policy(text: str, source: str) -> Policy:
    """:func:`load_policy` for text already read; ``source`` names it in messages."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            _one_line(f"authz-policy {source}{line}: not valid YAML: {exc.problem or exc.context}")
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(_one_line(f"authz-policy {source}: not valid YAML: {exc}")) from None
    except RecursionError:
        raise ConfigError(f"authz-policy {source}: not valid YAML: nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - the parser's own failures on odd input (ValueError, OverflowError, ...): still one line
        raise ConfigError(_one_line(f"authz-policy {source}: not valid YAML: {type(exc).__name__}: {exc}")) from None
    if root is None:
        raise ConfigError(f"authz-policy {source}: the file is empty; it must list callers (see docs/authorization.md)")
    try:
        return _policy(root)
    except _Problem as p:
        raise ConfigError(_one_line(f"authz-policy {source}:{p.line}: {p.where}: {p.problem}")) from None


def _policy(root: yaml.Node) -> Policy:
    top = _mapping(root, "the file", ("callers",), required=("callers",))
    callers = _sequence(top["callers"], "callers")
    grants: dict[str, Grant] = {}
    lines: dict[str, int] = {}
    for i, node in enumerate(callers):
        where = f"callers[{i}]"
        entry = _mapping(node, where, _CALLER_KEYS, required=("identity", "methods"))
        identity = _text(entry["identity"], f"{where}.identity")
        if any(c.isspace() for c in identity):
            raise _Problem(entry["identity"], f"{where}.identity", f"{identity!r} contains whitespace")
        if identity in grants:
            raise _Problem(
                entry["identity"],
                f"{where}.identity",
                f"{identity} is listed twice (also at line {lines[identity]}); give each caller one entry",
            )
        lines[identity] = entry["identity"].start_mark.line + 1
        methods = _methods(entry["methods"], f"{where}.methods")
        products = _products(entry["products"], f"{where}.products") if "products" in entry else {}
        grants[identity] = Grant(methods, products)
    if ANY in grants:
        grants = {who: g if who == ANY else g.merged(grants[ANY]) for who, g in grants.items()}
    return Policy(grants)


def _methods(node: yaml.Node, where: str) -> frozenset[str]:
    found: set[str] = set()
    for i, item in enumerate(_unique_texts(node, where)):
        name = _text(item, f"{where}[{i}]")
        service, _, method = name.partition("/")
        if method == ANY and service in SERVICES:
            found |= SERVICES[service]
        elif name in METHODS:
            found.add(name)
        else:
            raise _Problem(item, f"{where}[{i}]", f"no method {name!r} in the proto{_suggestion(name)}")
    return frozenset(found)


def _suggestion(name: str) -> str:
    known = sorted(METHODS | {f"{s}/{ANY}" for s in SERVICES})
    close = difflib.get_close_matches(name.lstrip("/"), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; write package.Service/Method or package.Service/{ANY}, e.g. {min(METHODS)!r}"


def _products(node: yaml.Node, where: str) -> dict[str, frozenset[str] | None]:
    products: dict[str, frozenset[str] | None] = {}
    for code, value in _mapping(node, where).items():
        here = f"{where}.{code}"
        if isinstance(value, yaml.ScalarNode) and value.tag != _NULL and value.value == ANY:
            products[code] = None
            continue
        if not isinstance(value, yaml.SequenceNode):
            raise _Problem(value, here, f'is {_kind(value)}; give a list of dimensions, or "{ANY}" for any dimension')
        dims = [_text(item, f"{here}[{i}]") for i, item in enumerate(_unique_texts(value, here))]
        if ANY in dims:
            raise _Problem(value, here, f'write "{ANY}" alone (not in a list) for any dimension')
        products[code] = frozenset(dims)
    return products


def _mapping(
    node: yaml.Node, where: str, keys: tuple[str, ...] = (), required: tuple[str, ...] = ()
) -> dict[str, yaml.Node]:
    """A mapping's entries by key; with ``keys``, only those (and all of ``required``)."""
    if not isinstance(node, yaml.MappingNode):
        raise _Problem(node, where, f"is {_kind(node)}, not a mapping")
    out: dict[str, yaml.Node] = {}
    for key_node, value in node.value:
        key = _text(key_node, f"{where} key")
        if key in out:
            raise _Problem(key_node, where, f"{key!r} appears twice")
        if keys and key not in keys:
            raise _Problem(key_node, where, f"unknown key {key!r} (allowed: {', '.join(keys)})")
        out[key] = value
    for key in required:
        if key not in out:
            raise _Problem(node, where, f"{key!r} is missing")
    return out


def _sequence(node: yaml.Node, where: str) -> list[yaml.Node]:
    if not isinstance(node, yaml.SequenceNode):
        raise _Problem(node, where, f"is {_kind(node)}, not a list")
    if not node.value:
        raise _Problem(node, where, "is an empty list")
    return list(node.value)


def _unique_texts(node: yaml.Node, where: str) -> list[yaml.Node]:
    """A non-empty list whose items are distinct texts."""
    items = _sequence(node, where)
    seen: set[str] = set()
    for i, item in enumerate(items):
        text = _text(item, f"{where}[{i}]")
        if text in seen:
            raise _Problem(item, f"{where}[{i}]", f"{text!r} is listed twice")
        seen.add(text)
    return items


def _text(node: yaml.Node, where: str) -> str:
    """A scalar's text as written (``0123`` stays ``"0123"``); never empty."""
    if not isinstance(node, yaml.ScalarNode):
        raise _Problem(node, where, f"is {_kind(node)}, not a single value")
    if node.tag == _NULL or not node.value.strip():
        raise _Problem(node, where, "is empty")
    return str(node.value)


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return "empty" if node.tag == _NULL else f"the value {node.value!r}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
