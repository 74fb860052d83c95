"""Recorded usage: RecordUsage's path through the gateway.

request → validate (:mod:`.servicer`) → spool (:mod:`.spool`: :mod:`.sqlite` or
:mod:`.postgres`, the shared rules in :mod:`.sql`) → placement into hourly
records (:mod:`.placement`) → sender (:mod:`.sender`) → AWS. :mod:`.lifecycle`
opens, watches and closes these parts for the assembly. Nothing in the
MeterUsage path imports this package.
"""
