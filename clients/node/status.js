// Decodes the gateway's error details: the google.rpc.Status that every
// non-OK answer carries in the `grpc-status-details-bin` trailer, with its
// google.rpc.ErrorInfo, BadRequest and RetryInfo unpacked from their Any.
//
// The two googleapis files (google/rpc/status.proto, error_details.proto) are
// vendored under ./protos, so decoding needs no network and no other
// package; protobufjs ships google/protobuf/any.proto and duration.proto.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const protobuf = require("protobufjs");

const root = new protobuf.Root();
root.resolvePath = (origin, target) => {
  const local = path.join(__dirname, "protos", target);
  return fs.existsSync(local) ? local : protobuf.util.path.resolve(origin, target);
};
root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });

const Status = root.lookupType("google.rpc.Status");
const DETAIL_KEY = "grpc-status-details-bin";

function unpack(any) {
  const name = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
  const type = root.lookupType(name);
  return { type: name, ...type.toObject(type.decode(any.value), { longs: Number, defaults: true }) };
}

// The details of a failed call, or null when the status carries none.
function statusDetails(error) {
  const [raw] = error.metadata ? error.metadata.get(DETAIL_KEY) : [];
  if (!raw) return null;
  const status = Status.decode(raw);
  const details = status.details.map(unpack);
  const info = details.find((d) => d.type === "google.rpc.ErrorInfo") || null;
  const badRequest = details.find((d) => d.type === "google.rpc.BadRequest");
  const retry = details.find((d) => d.type === "google.rpc.RetryInfo");
  return {
    code: status.code,
    message: status.message,
    reason: info ? info.reason : "",
    domain: info ? info.domain : "",
    metadata: info ? info.metadata : {},
    fieldViolations: badRequest ? badRequest.field_violations.map((v) => ({ field: v.field, description: v.description })) : [],
    retryDelaySeconds: retry ? Number(retry.retry_delay.seconds) + retry.retry_delay.nanos / 1e9 : null,
  };
}

module.exports = { statusDetails };
