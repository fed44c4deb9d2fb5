// marina.js: serve a fetch-style handler, `async (request: Request) => Response`, as the wasi:http
// `incoming-handler` export, which componentize-js builds into a component whose instances serve request after
// request.
//
// componentize-js can also build a component from `addEventListener('fetch', ...)`, but its engine keeps one
// FetchEvent per instance: a reused instance answers nothing. Marina notices and serves such a version on fresh
// instances only, which costs a new instance per request. Exporting the handler instead makes `ttl > 0` work as
// for any component. The entry file must itself say `export const incomingHandler`: componentize-js looks for it
// there to leave its fetch event out.

import { getEnvironment } from 'wasi:cli/environment@0.2.12';
import { Fields, IncomingBody, OutgoingBody, OutgoingResponse, ResponseOutparam } from 'wasi:http/types@0.2.12';

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// The most bytes one `blocking-write-and-flush` may take (the wasi:io streams contract).
const WRITE_CHUNK = 4096;
// How much of the request body one read asks for.
const READ_CHUNK = 65536n;

// The app's environment: the version's `env` from worker.config.json, plus MARINA_APP and MARINA_VERSION.
export function env(name) {
  for (const [key, value] of getEnvironment()) {
    if (key === name) return value;
  }
  return undefined;
}

// Wraps `handler` as the `incomingHandler` export. The request body is read whole before the handler runs
// (Marina bounds it by the version's `maxBodySize`); the response body is written as the handler's Response
// produces it. A handler that throws answers 500 with the error's message, and the instance lives on.
export function serve(handler) {
  return {
    async handle(incoming, outparam) {
      let response;
      try {
        response = await handler(webRequest(incoming));
      } catch (error) {
        response = new Response(`the handler failed: ${error}\n`, { status: 500 });
      }
      await send(response, outparam);
    },
  };
}

function webRequest(incoming) {
  const method = incoming.method();
  const name = method.tag === 'other' ? method.val : method.tag.toUpperCase();
  const scheme = incoming.scheme();
  const protocol = scheme?.tag === 'HTTPS' ? 'https' : scheme?.tag === 'other' ? scheme.val : 'http';
  const url = `${protocol}://${incoming.authority() ?? 'localhost'}${incoming.pathWithQuery() ?? '/'}`;
  const headers = new Headers();
  const fields = incoming.headers();
  for (const [key, value] of fields.entries()) headers.append(key, decoder.decode(value));
  fields[Symbol.dispose]();
  const body = name === 'GET' || name === 'HEAD' ? undefined : readBody(incoming);
  return new Request(url, { method: name, headers, body });
}

function readBody(incoming) {
  const body = incoming.consume();
  const stream = body.stream();
  const chunks = [];
  let length = 0;
  for (;;) {
    let chunk;
    try {
      chunk = stream.blockingRead(READ_CHUNK);
    } catch (error) {
      if (error?.payload?.tag === 'closed') break;
      throw error;
    }
    chunks.push(chunk);
    length += chunk.length;
  }
  stream[Symbol.dispose]();
  IncomingBody.finish(body)[Symbol.dispose]();
  const whole = new Uint8Array(length);
  let at = 0;
  for (const chunk of chunks) {
    whole.set(chunk, at);
    at += chunk.length;
  }
  return whole;
}

async function send(response, outparam) {
  // The length is the transport's business: a body written as it comes goes chunked.
  const list = [];
  for (const [key, value] of response.headers) {
    if (key !== 'content-length') list.push([key, encoder.encode(value)]);
  }
  const outgoing = new OutgoingResponse(Fields.fromList(list));
  outgoing.setStatusCode(response.status);
  const body = outgoing.body();
  // The head goes first, so that the client starts receiving while the body is written.
  ResponseOutparam.set(outparam, { tag: 'ok', val: outgoing });
  const stream = body.write();
  try {
    if (response.body) {
      const reader = response.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        for (let at = 0; at < value.length; at += WRITE_CHUNK) {
          stream.blockingWriteAndFlush(value.subarray(at, at + WRITE_CHUNK));
        }
      }
    }
  } catch {
    // The client went away, or the body failed midway: the response cannot be finished. Dropping the body
    // unfinished tells the host so, and an exception let out of `handle` would trap the instance.
    stream[Symbol.dispose]();
    body[Symbol.dispose]();
    return;
  }
  stream[Symbol.dispose]();
  OutgoingBody.finish(body, undefined);
}
