"""The AWS adapter: the one boto3 client, its retry loop, request parameters to and from
protobuf, the credential diagnosis, and the rate limit of calls to AWS.

Imports :mod:`gateway.domain` (to classify AWS's answers) and :mod:`gateway.observability`;
never either path, the RPC layer or the assembly.
"""
