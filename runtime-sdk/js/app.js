// hello-js: a Marina app in JavaScript, built into a wasi:http component by componentize-js.
//
// `GET /` greets (the greeting comes from the `GREETING` variable of worker.config.json's `env`, if set),
// `GET /env/NAME` answers the variable NAME of the app's environment (404 when unset), `GET /base` the prefix the
// request came under (Marina's `x-marina-base` header, such as `/hello-js@1`), `POST /echo` answers the request's
// body with its content type, and `GET /count` how many requests this instance has served, which shows whether
// instances are reused (`ttl > 0`) or fresh (`ttl: 0`).

import { env, serve } from './marina.js';

// Module state lives as long as the instance: one request with `ttl: 0`, many with `ttl > 0`.
let served = 0;

const text = (body, status = 200) =>
  new Response(body, { status, headers: { 'content-type': 'text/plain; charset=utf-8' } });

export const incomingHandler = serve(async (request) => {
  served += 1;
  const { pathname } = new URL(request.url);
  if (request.method === 'POST' && pathname === '/echo') {
    const type = request.headers.get('content-type') ?? 'application/octet-stream';
    return new Response(await request.arrayBuffer(), { headers: { 'content-type': type } });
  }
  if (request.method !== 'GET') return text('use GET, or POST /echo\n', 405);
  if (pathname === '/') return text(`${env('GREETING') ?? 'Hello'} from JavaScript\n`);
  if (pathname.startsWith('/env/')) {
    const value = env(pathname.slice('/env/'.length));
    return value === undefined ? text('not set\n', 404) : text(value);
  }
  if (pathname === '/base') return text(request.headers.get('x-marina-base') ?? '');
  if (pathname === '/count') return text(`${served}\n`);
  return text('no such page\n', 404);
});
