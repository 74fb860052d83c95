"""AWS's bookkeeping of SaaS metering (BatchMeterUsage, ResolveCustomer): pure, no I/O, time passed in.

Concurrent Agreements: a buyer is named by their AWS account and the license of
one agreement (``CustomerAWSAccountId`` + ``LicenseArn``); legacy integrations
name a ``CustomerIdentifier`` and the request's ``ProductCode`` instead. AWS
knows which licenses belong to which product and who subscribed under them; here
the control API says so (:meth:`Saas.subscribe`, :meth:`Saas.issue_token`).

A BatchMeterUsage call is refused as a whole (an AwsError, nothing recorded),
the first group that finds anything answering:

1. the body, whatever AWS's clock and state (:func:`rules.batch_problems`): less
   than 1 MB, the model, one way of naming customers, the quantity rules per record;
2. the time (:func:`window_problems`), ``TimestampOutOfBoundsException``: a record
   older than 24 hours ("up to 24 hours in the past"), more than the future skew
   ahead, or of an earlier month (UTC) once 06:00 UTC on the 1st has passed
   (the month-end grace: at 2026-04-01T05:00Z March 31 23:00 is taken, at 06:00 not);
3. licenses, ``InvalidLicenseException``: one AWS never issued, or licenses of two
   products in one call ("each BatchMeterUsage request is for only one product");
4. with ``products`` configured: a request ``ProductCode`` that is not one
   (``InvalidProductCodeException``, as is an empty one), a dimension the
   product lacks (``InvalidUsageDimensionException``).

An accepted call has a result per record, in request order (:meth:`Saas.meter`):
``CustomerNotSubscribed`` unless the account is subscribed under that license (or
the legacy identifier to that product); else AWS keeps one record per customer,
dimension and hour (the timestamp rounded down) and the first wins: the same
quantity (by value: 17 == 17.0 == "17.000") and allocations again is ``Success``
with the first record's MeteringRecordId (identical resends and subsets of a call
are idempotent), another is ``DuplicateRecord`` and the first stays billed. The
license key and the legacy key are different customers to AWS: usage sent both
ways in one hour is billed twice, as AWS warns.
"""

from __future__ import annotations

import math
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from gateway.local_aws import rules
from gateway.local_aws.state import Allocations, AwsError, booked, by_value

BATCH_METER_USAGE = rules.BATCH_OPERATION
RESOLVE_CUSTOMER = "ResolveCustomer"
# A record's Status, as botocore's model enumerates them.
SUCCESS = "Success"
CUSTOMER_NOT_SUBSCRIBED = "CustomerNotSubscribed"
DUPLICATE_RECORD = "DuplicateRecord"
MAX_AGE = timedelta(hours=24)  # "up to 24 hours in the past"
MONTH_END_GRACE = timedelta(hours=6)  # the previous month's usage until 06:00 UTC on the 1st
INVALID_TOKEN = "InvalidTokenException"
EXPIRED_TOKEN = "ExpiredTokenException"
DEFAULT_TOKEN_TTL = 3600.0  # seconds

# (way, customer, license or product): ("license", account, LicenseArn) or ("legacy", identifier, ProductCode)
CustomerKey = tuple[str, str, str]


@dataclass(frozen=True)
class SaasRecord:
    """A SaaS metering record as AWS keeps it (and bills it)."""

    metering_record_id: str
    product_code: str  # the license's product, or the legacy request's ProductCode
    license_arn: str  # "" for a legacy record
    customer_aws_account_id: str  # a legacy record: the account AWS knows for the identifier ("" if none)
    customer_identifier: str  # "" for a license record
    dimension: str
    hour: datetime
    timestamp: datetime
    quantity: Decimal
    allocations: Allocations

    def to_json(self) -> dict[str, Any]:
        return {
            "MeteringRecordId": self.metering_record_id,
            "ProductCode": self.product_code,
            "LicenseArn": self.license_arn,
            "CustomerAWSAccountId": self.customer_aws_account_id,
            "CustomerIdentifier": self.customer_identifier,
            "Dimension": self.dimension,
            "Hour": self.hour.isoformat(),
            "Timestamp": self.timestamp.isoformat(),
            "Quantity": str(self.quantity),
            "Allocations": [
                {"Tags": sorted([k, v] for k, v in tags), "Quantity": str(q)} for tags, q in self.allocations
            ],
        }


@dataclass(frozen=True)
class Result:
    """One record's UsageRecordResult: the record as sent, its status, its id when honoured."""

    record: rules.UsageRecord
    status: str
    metering_record_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"UsageRecord": dict(self.record.sent), "Status": self.status}
        if self.metering_record_id is not None:
            out["MeteringRecordId"] = self.metering_record_id
        return out


@dataclass(frozen=True)
class Batch:
    """An accepted BatchMeterUsage call: its one product and its records."""

    product_code: str
    records: tuple[rules.UsageRecord, ...]


@dataclass(frozen=True)
class Token:
    """A registration token the buyer's browser brings; what ResolveCustomer answers for it."""

    product_code: str
    customer_aws_account_id: str
    license_arn: str
    customer_identifier: str  # "" as for new integrations: the answer has none
    expires_at: datetime

    def answer(self) -> dict[str, str]:
        out = {
            "CustomerIdentifier": self.customer_identifier,
            "ProductCode": self.product_code,
            "CustomerAWSAccountId": self.customer_aws_account_id,
            "LicenseArn": self.license_arn,
        }
        return {k: v for k, v in out.items() if v}


def window_problems(
    records: Sequence[rules.UsageRecord],
    now: datetime,
    *,
    max_age: timedelta = MAX_AGE,
    future_skew: timedelta = rules.FUTURE_SKEW,
    grace: timedelta = MONTH_END_GRACE,
) -> list[rules.Problem]:
    """Each record's timestamp AWS does not take at ``now``: too old, too far ahead, or of
    a month that closed at 06:00 UTC on the 1st of ``now``'s."""
    now = now.astimezone(UTC)  # the month is UTC's
    month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    closed = now >= month_start + grace
    out: list[rules.Problem] = []
    for r in records:
        where = f"UsageRecords[{r.index}].Timestamp"
        if r.timestamp < now - max_age:
            message = f"is more than {max_age.total_seconds() / 3600:g} hours older than AWS's clock"
        elif r.timestamp > now + future_skew:
            message = f"is more than {future_skew.total_seconds():g} seconds ahead of AWS's clock"
        elif closed and r.timestamp < month_start:
            message = (
                f"is usage of a month AWS closed at {(month_start + grace).isoformat()} "
                "(the previous month's usage is taken until 06:00 UTC on the 1st)"
            )
        else:
            continue
        out.append(rules.Problem(where, message, rules.TIMESTAMP_OUT_OF_BOUNDS))
    return out


def _checked(name: str, value: Any, spec: rules.Spec) -> str:
    """A control API value the model takes (so that calls naming it can succeed); ValueError otherwise."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    found = rules.model_problems(value, spec, name)
    if found:
        raise ValueError("; ".join(str(p) for p in found))
    return value


def _field(name: str) -> rules.Spec:
    return rules.record_spec().members[name]


def _product(value: Any) -> str:
    return _checked("product_code", value, rules.batch_meter_usage_spec().members["ProductCode"])


@dataclass
class Saas:
    """AWS's side of SaaS metering: licenses, subscriptions, tokens, records. Not thread-safe: the caller locks."""

    products: Mapping[str, frozenset[str]] | None = None  # None: every product and dimension exists
    max_age: timedelta = MAX_AGE
    future_skew: timedelta = rules.FUTURE_SKEW
    grace: timedelta = MONTH_END_GRACE
    licenses: dict[str, str] = field(default_factory=dict)  # LicenseArn → its product
    accounts: set[tuple[str, str]] = field(default_factory=set)  # (CustomerAWSAccountId, LicenseArn) subscribed
    legacy: dict[tuple[str, str], str] = field(default_factory=dict)  # (identifier, product) subscribed → account
    tokens: dict[str, Token] = field(default_factory=dict)
    by_hour: dict[tuple[CustomerKey, str, datetime], tuple[Any, SaasRecord]] = field(default_factory=dict)
    records: list[SaasRecord] = field(default_factory=list)

    # --- what the buyer did (the control API) ---------------------------------

    def subscribe(self, *, customer_aws_account_id: str, license_arn: str, product_code: str) -> None:
        """The account subscribed under the license, a license of ``product_code``.

        AWS grants each agreement its own license; here several accounts may share
        one, so that a test meters many customers over a few licenses cheaply.
        ValueError for a license already of another product, or an unknown product.
        """
        account, license_arn, product = self._license_subscription(customer_aws_account_id, license_arn, product_code)
        self.licenses[license_arn] = product
        self.accounts.add((account, license_arn))

    def subscribe_legacy(
        self, *, customer_identifier: str, product_code: str, customer_aws_account_id: str = ""
    ) -> None:
        """The legacy identifier subscribed to ``product_code`` (its account, when given, is what AWS bills)."""
        key = self._legacy_subscription(customer_identifier, product_code, customer_aws_account_id)
        self.legacy[key] = customer_aws_account_id

    def unsubscribe(
        self,
        *,
        product_code: str,
        customer_aws_account_id: str = "",
        license_arn: str = "",
        customer_identifier: str = "",
    ) -> None:
        """The subscription ends (the legacy one when ``customer_identifier`` is given): later
        records for the customer are CustomerNotSubscribed; kept records stay. ValueError: none such."""
        if customer_identifier:
            if self.legacy.pop((customer_identifier, product_code), None) is None:
                raise ValueError(f"{customer_identifier} is not subscribed to {product_code}")
            return
        if (
            self.licenses.get(license_arn) != product_code
            or (customer_aws_account_id, license_arn) not in self.accounts
        ):
            raise ValueError(f"{customer_aws_account_id} is not subscribed under {license_arn} of {product_code}")
        self.accounts.discard((customer_aws_account_id, license_arn))

    def subscriptions(self) -> list[dict[str, str]]:
        """The subscriptions, in the control API's own keys (a listed one can be unsubscribed as is)."""
        out = [
            {"customer_aws_account_id": a, "license_arn": lic, "product_code": self.licenses[lic]}
            for a, lic in sorted(self.accounts)
        ]
        out += [
            {"customer_identifier": i, "product_code": p, "customer_aws_account_id": a}
            for (i, p), a in sorted(self.legacy.items())
        ]
        return out

    def issue_token(
        self,
        now: datetime,
        *,
        product_code: str,
        customer_aws_account_id: str = "",
        license_arn: str = "",
        customer_identifier: str = "",
        ttl: float = DEFAULT_TOKEN_TTL,
    ) -> str:
        """The registration token AWS hands the buyer's browser, valid ``ttl`` seconds; the
        buyer who got one has subscribed (under the license and/or, legacy, by identifier)."""
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        if not license_arn and not customer_identifier:
            raise ValueError("a token needs customer_aws_account_id and license_arn, or a customer_identifier")
        if license_arn:  # every check first: a refused token subscribes nobody
            self._license_subscription(customer_aws_account_id, license_arn, product_code)
        if customer_identifier:
            self._legacy_subscription(customer_identifier, product_code, customer_aws_account_id)
        if license_arn:
            self.subscribe(
                customer_aws_account_id=customer_aws_account_id, license_arn=license_arn, product_code=product_code
            )
        if customer_identifier:
            self.subscribe_legacy(
                customer_identifier=customer_identifier,
                product_code=product_code,
                customer_aws_account_id=customer_aws_account_id,
            )
        token = secrets.token_urlsafe(32)
        expires = now + timedelta(seconds=ttl)
        self.tokens[token] = Token(product_code, customer_aws_account_id, license_arn, customer_identifier, expires)
        return token

    # --- the API ----------------------------------------------------------------

    def resolve_customer(self, body: Any, now: datetime) -> dict[str, str]:
        """ResolveCustomer: the customer a token names, as often as asked until it expires."""
        found = rules.model_problems(body, rules.input_spec(RESOLVE_CUSTOMER))
        if found:
            raise AwsError(found[0].code, "; ".join(str(p) for p in found))
        token = self.tokens.get(body["RegistrationToken"])
        if token is None:
            raise AwsError(INVALID_TOKEN, "Registration token is invalid")
        if now >= token.expires_at:
            raise AwsError(EXPIRED_TOKEN, f"Registration token expired at {token.expires_at.isoformat()}")
        return token.answer()

    def accept(self, body: Any, now: datetime, size: int | None = None) -> Batch:
        """A BatchMeterUsage call AWS takes, or the AwsError it refuses it with (nothing recorded)."""
        found = rules.batch_problems(body, size)
        if found:
            raise _refusal(found)
        records = rules.usage_records_of(body)
        found = window_problems(records, now, max_age=self.max_age, future_skew=self.future_skew, grace=self.grace)
        if found:
            raise _refusal(found)
        product = self._product_of(body, records)
        found = self._product_problems(product, records, legacy=body.get("ProductCode") is not None)
        if found:
            raise _refusal(found)
        return Batch(product, records)

    def meter(self, batch: Batch, record: rules.UsageRecord) -> Result:
        """One record of an accepted call: its status, the record kept when new."""
        key = self._subscribed(batch.product_code, record)
        if key is None:
            return Result(record, CUSTOMER_NOT_SUBSCRIBED)
        hour = record.timestamp.replace(minute=0, second=0, microsecond=0)
        allocations = booked(record.allocations)
        value = (by_value(record.quantity), allocations)
        seen = self.by_hour.get((key, record.dimension, hour))
        if seen is not None:
            same, kept = seen
            if same != value:
                return Result(record, DUPLICATE_RECORD)
            return Result(record, SUCCESS, kept.metering_record_id)
        kept = SaasRecord(
            metering_record_id=str(uuid.uuid4()),
            product_code=batch.product_code,
            license_arn=record.license_arn or "",
            customer_aws_account_id=record.customer_aws_account_id
            or self.legacy.get((record.customer_identifier or "", batch.product_code), ""),
            customer_identifier=record.customer_identifier or "",
            dimension=record.dimension,
            hour=hour,
            timestamp=record.timestamp,
            quantity=record.quantity,
            allocations=allocations,
        )
        self.by_hour[(key, record.dimension, hour)] = (value, kept)
        self.records.append(kept)
        return Result(record, SUCCESS, kept.metering_record_id)

    def usage(self) -> list[dict[str, str]]:
        """What AWS bills: quantities summed per product, license, account, identifier, dimension and hour."""
        totals: dict[tuple[str, str, str, str, str, datetime], Decimal] = {}
        for r in self.records:
            key = (r.product_code, r.license_arn, r.customer_aws_account_id, r.customer_identifier, r.dimension, r.hour)
            totals[key] = totals.get(key, Decimal(0)) + r.quantity
        names = ("ProductCode", "LicenseArn", "CustomerAWSAccountId", "CustomerIdentifier", "Dimension")
        return [
            {**dict(zip(names, key[:5], strict=True)), "Hour": key[5].isoformat(), "Quantity": str(total)}
            for key, total in sorted(totals.items())
        ]

    # --- helpers ------------------------------------------------------------------

    def _license_subscription(self, account: str, license_arn: str, product_code: str) -> tuple[str, str, str]:
        """(account, license, product) of a license subscription AWS could have; ValueError otherwise."""
        account = _checked("customer_aws_account_id", account, _field("CustomerAWSAccountId"))
        license_arn = _checked("license_arn", license_arn, _field("LicenseArn"))
        product = self._known(_product(product_code))
        owner = self.licenses.get(license_arn, product)
        if owner != product:
            raise ValueError(f"license {license_arn} is a license of {owner}, not of {product}")
        return account, license_arn, product

    def _legacy_subscription(self, identifier: str, product_code: str, account: str) -> tuple[str, str]:
        """(identifier, product) of a legacy subscription AWS could have; ValueError otherwise."""
        identifier = _checked("customer_identifier", identifier, _field("CustomerIdentifier"))
        product = self._known(_product(product_code))
        if account:
            _checked("customer_aws_account_id", account, _field("CustomerAWSAccountId"))
        return identifier, product

    def _known(self, product: str) -> str:
        if self.products is not None and product not in self.products:
            raise ValueError(f"product {product} is not one of the configured products {sorted(self.products)}")
        return product

    def _product_of(self, body: Mapping[str, Any], records: Sequence[rules.UsageRecord]) -> str:
        """The call's one product: the request's ProductCode (legacy) or its licenses'."""
        if body.get("ProductCode") is not None:
            return str(body["ProductCode"])
        owners: dict[str, str] = {}
        for r in records:
            assert r.license_arn is not None  # rules.batch_problems: a record without an identifier has one
            if r.license_arn not in self.licenses:
                raise AwsError(
                    rules.INVALID_LICENSE, f"UsageRecords[{r.index}].LicenseArn {r.license_arn} is not a valid license"
                )
            owners.setdefault(self.licenses[r.license_arn], r.license_arn)
        if len(owners) > 1:
            shown = ", ".join(f"{lic} of {p}" for p, lic in sorted(owners.items()))
            raise AwsError(rules.INVALID_LICENSE, f"the licenses are of more than one product ({shown}); one a call")
        return next(iter(owners))

    def _product_problems(
        self, product: str, records: Sequence[rules.UsageRecord], *, legacy: bool
    ) -> list[rules.Problem]:
        if legacy and (product == "" or (self.products is not None and product not in self.products)):
            return [rules.Problem("ProductCode", f"{product!r} is not a product code", rules.INVALID_PRODUCT_CODE)]
        if self.products is None:
            return []
        dimensions = self.products.get(product, frozenset())
        return [
            rules.Problem(
                f"UsageRecords[{r.index}].Dimension",
                f"{r.dimension!r} is not a dimension of {product}",
                rules.INVALID_USAGE_DIMENSION,
            )
            for r in records
            if r.dimension not in dimensions
        ]

    def _subscribed(self, product: str, record: rules.UsageRecord) -> CustomerKey | None:
        """The record's customer key when the customer is subscribed; None: CustomerNotSubscribed."""
        if record.customer_identifier is not None:
            key = ("legacy", record.customer_identifier, product)
            return key if (record.customer_identifier, product) in self.legacy else None
        assert record.customer_aws_account_id is not None and record.license_arn is not None
        key = ("license", record.customer_aws_account_id, record.license_arn)
        return key if (record.customer_aws_account_id, record.license_arn) in self.accounts else None


def _refusal(found: Sequence[rules.Problem]) -> AwsError:
    """The AwsError of a refused call: the first problem's exception, every problem said."""
    return AwsError(found[0].code, "; ".join(str(p) for p in found))
