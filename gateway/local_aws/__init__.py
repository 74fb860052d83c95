"""A local stand-in for the AWS Marketplace Metering endpoint. Nothing is billed.

``metering-gateway local-aws`` runs it on its own. It speaks AWS's JSON 1.1
protocol on a loopback port, so a real boto3 client (signing, serialising,
parsing errors) talks to it as it would to AWS, and it keeps AWS's rules:

- the request rules of botocore's model of MeterUsage (required members,
  lengths, ranges, patterns), read at run time, plus AWS's documented rules the
  model cannot express: the six-hour window, allocations of the request's kind
  summing exactly to its quantity, unique tag sets; answered with AWS's
  exception names (:mod:`.rules`). It shares no code with the gateway's own
  validation, so that each checks the other;
- one record per product, dimension and hour (the timestamp rounded down) per
  caller identity; the identical request again returns the same record id
  (quantities compared by value: 17 == 17.0), another quantity is a
  ``DuplicateRequestException``;
- a ``ClientToken`` replayed with the same parameters returns the same record,
  with other parameters an ``IdempotencyConflictException`` (:mod:`.state`);
- ``DryRun`` answers ``DryRunOperation`` without recording anything.

With ``agentcore`` (``local-aws --agentcore``, ``serve --local --agentcore``, or
``POST /_local/reset`` with ``{"agentcore": true}``) it keeps Amazon Bedrock
AgentCore Runtime's rules instead (:mod:`.state`): a ClientToken is required
(``ValidationException``), usage allocations are refused
(``InvalidUsageAllocationsException``), the timestamp is kept exact and
deduplicates nothing, and each new token is a new record, so an hour holds many;
``GET /_local/usage`` sums them per product, dimension and hour, as AWS bills them
(``GET /_local/mode`` says which rules apply).

For tests of the callers it can also refuse unknown products and dimensions,
throttle above a rate, and fail the next calls on demand, in process
(:meth:`LocalAws.inject`) or over HTTP (``POST /_local/faults`` with
``{"error", "count", "message", "status", "delay", "record", "operation"}``).
The fault kinds (:mod:`.faults`):

- an AWS error code, answered with its ``status`` (default 400; 500 for
  ``InternalServiceErrorException``);
- ``""``: only the HTTP ``status``, no error type, as a load balancer's 502/503/504;
- ``"drop"`` (DROP): the connection closes without an answer;
- ``"slow"`` (SLOW): the normal answer, ``delay`` seconds late;
- ``"unprocessed"`` (UNPROCESSED, BatchMeterUsage only): 200, but the last
  ceil(n/2) of the n records come back in ``UnprocessedRecords``.

By default a fault fails the call before AWS applies it. With ``"record": true``
AWS applies the call first, exactly as a successful one, and then the answer is
lost: a 5xx, a dropped connection, or SLOW beyond the caller's read timeout;
a call AWS's rules refuse is refused as usual. ``"operation": "MeterUsage"``
keeps a fault for that operation's calls; control calls are never faulted.

It answers AWS's SaaS operations too (:mod:`.saas`), Concurrent Agreements'
model: BatchMeterUsage (up to 25 records a call, under 1 MB; each names its
customer by ``CustomerAWSAccountId`` and ``LicenseArn``, or, legacy, by
``CustomerIdentifier`` with the request's ``ProductCode``; the 24-hour window
and the month-end cutoff at 06:00 UTC on the 1st; a result per record:
``Success``, ``CustomerNotSubscribed`` or ``DuplicateRecord``) and
ResolveCustomer (tokens the control API issued, until they expire). What buyers
did is said over ``/_local/subscriptions`` (GET, POST, DELETE) and ``POST
/_local/tokens``; ``GET /_local/saas-records`` and ``GET /_local/saas-usage``
show what AWS kept and bills.

It also answers RegisterUsage (:mod:`.registration`): a JWT signed with a key pair
of its own, the nonce echoed; ``GET /_local/register-usage`` shows the public key
(PEM) and its version, ``POST /_local/register-usage`` sets whether the buyer is
subscribed, the platform and Region supported, or the answer signed with a wrong key.

``GET /_local/records`` lists what it recorded, ``GET /_local/faults`` the
faults not yet taken, ``DELETE /_local/faults`` drops them, ``POST
/_local/reset`` forgets everything.
"""

from gateway.local_aws.faults import BARE, DROP, SLOW, UNPROCESSED, Fault
from gateway.local_aws.registration import Registrar
from gateway.local_aws.saas import CUSTOMER_NOT_SUBSCRIBED, DUPLICATE_RECORD, SUCCESS, Saas, SaasRecord
from gateway.local_aws.server import BANNER, CONTENT_TYPE, TARGET_PREFIX, LocalAws
from gateway.local_aws.state import AwsError, Record, State

__all__ = [
    "BANNER",
    "BARE",
    "CONTENT_TYPE",
    "CUSTOMER_NOT_SUBSCRIBED",
    "DROP",
    "DUPLICATE_RECORD",
    "SLOW",
    "SUCCESS",
    "TARGET_PREFIX",
    "UNPROCESSED",
    "AwsError",
    "Fault",
    "LocalAws",
    "Record",
    "Registrar",
    "Saas",
    "SaasRecord",
    "State",
]
