// quotad from Node, built from protos/ at run time: reserve, commit, a denial, and the
// google.rpc details of refused calls (see "Other languages" in the README).
//
//   npm install @grpc/grpc-js @grpc/proto-loader        (protobufjs comes with proto-loader)
//   node reserve_commit.js TARGET GOOGLEAPIS_PROTOS USER_ID
//
// TARGET is quotad's address (open mode: a loopback address, no key). GOOGLEAPIS_PROTOS is
// the folder that holds google/rpc/status.proto. USER_ID must be subscribed to a plan with a
// group matching "openai.*" and room for 4000. Prints one JSON object with every answer.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const [target, googleapisProtos, userId] = process.argv.slice(2);
if (!target || !googleapisProtos || !userId) {
  console.error("usage: node reserve_commit.js TARGET GOOGLEAPIS_PROTOS USER_ID");
  process.exit(2);
}
const includeDirs = [path.join(__dirname, "..", "..", "protos"), googleapisProtos];
const DEADLINE_MS = 10_000;

// Without these options fields are dropped or changed without a word: snake_case names
// (keepCase), int64 amounts past 2^53 (longs), enum names (enums), proto3 zero values such as
// allowed = false (defaults), and which member of a oneof is set (oneofs).
const loaderOptions = {
  keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs,
};
const definition = protoLoader.loadSync("quotad/v1/quotad.proto", loaderOptions);
const quotad = grpc.loadPackageDefinition(definition).quotad.v1;
const client = new quotad.QuotaService(target, grpc.credentials.createInsecure());

// The status details are google.protobuf.Any: decode them with protobufjs, from the same
// .proto files (google/protobuf/* are built into protobufjs).
const googleRpc = new protobuf.Root();
googleRpc.resolvePath = (origin, file) => path.join(googleapisProtos, file);
googleRpc.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"],
                   {keepCase: true});
const decodeOptions = {longs: String, enums: String, defaults: true};

function decodeDetails(details) {
  // Each Any names its type: type.googleapis.com/google.rpc.BadRequest, .../ErrorInfo, ...
  return details.map((any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const type = googleRpc.lookupType(typeName);
    return {type: typeName, ...type.toObject(type.decode(any.value), decodeOptions)};
  });
}

function refusal(error) {
  // grpc-js hands the trailers over as error.metadata; -bin values arrive as Buffers.
  const [statusBytes] = error.metadata.get("grpc-status-details-bin");
  const Status = googleRpc.lookupType("google.rpc.Status");
  const status = statusBytes ? Status.decode(statusBytes) : {details: []};
  return {
    code: error.code, code_name: grpc.status[error.code], message: error.details,
    details: decodeDetails(status.details),
  };
}

function call(method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, {deadline: Date.now() + DEADLINE_MS},
                   (error, response) => (error ? reject(error) : resolve(response)));
  });
}

async function refused(method, request) {
  try {
    const response = await call(method, request);
    return {unexpected_answer: response};
  } catch (error) {
    if (error.metadata === undefined) throw error;
    return refusal(error);
  }
}

async function main() {
  const answers = {};
  // int64 fields go out as strings too: 2^53 is past what a JavaScript number holds exactly.
  answers.reserve = await call("Reserve", {
    user_id: userId, event_type: "openai.chat", amount: "4000", metadata: {model: "gpt-4o"},
    ttl: {seconds: "60"},
  });
  answers.commit = await call("Commit", {
    reservation_id: answers.reserve.reservation_id, amount: "1234",
  });
  answers.denied = await call("Reserve", {
    user_id: userId, event_type: "openai.chat", amount: "9007199254740992",
  });
  // An invalid request: INVALID_ARGUMENT with a BadRequest naming each bad field.
  answers.invalid = await refused("Reserve", {user_id: "", event_type: "openai.chat", amount: "0"});
  // A user with no subscription: FAILED_PRECONDITION with ErrorInfo reason NO_PLAN.
  answers.no_plan = await refused("Reserve", {
    user_id: `${userId}-never-subscribed`, event_type: "openai.chat", amount: "1",
  });
  // In a Batch each operation answers alone; the oneof names what each result holds, and an
  // error result is a google.rpc.Status already decoded, its details still Any.
  const batch = await call("Batch", {operations: [
    {get_usage: {user_id: userId}},
    {reserve: {user_id: "", event_type: "openai.chat", amount: "1"}},
  ]});
  answers.batch = batch.results.map((result) => (result.result === "error"
    ? {result: "error", code: result.error.code, details: decodeDetails(result.error.details)}
    : {result: result.result, answer: result[result.result]}));
  return answers;
}

main().then(
  (answers) => { console.log(JSON.stringify(answers)); client.close(); },
  (error) => { console.error(error); client.close(); process.exit(1); },
);
