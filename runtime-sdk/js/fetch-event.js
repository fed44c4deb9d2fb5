// The other style componentize-js builds: a service worker's `fetch` event. It needs nothing of marina.js, but
// componentize-js's engine keeps one FetchEvent per instance, so an instance answers only its first request; on
// the second it returns without a response. Marina notices the first time a reused instance does so and from then
// on serves the version on a fresh instance per request (logged once, and shown in /_/deployments). Prefer
// app.js's style, whose instances are reused.

let served = 0;

addEventListener('fetch', (event) => {
  served += 1;
  event.respondWith(new Response(`fetch event ${served}\n`, { headers: { 'content-type': 'text/plain' } }));
});
