"""The composition root: from settings to serving processes.

:mod:`.app` wires one process (the AWS client, both paths, the RPC server, metrics,
signals); :mod:`.workers` runs ``--processes N`` of them. The only package that
imports both paths; nothing imports it but the command line.
"""
