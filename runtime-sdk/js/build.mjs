// Builds a JavaScript app into a wasi:http component with componentize-js: `node build.mjs SOURCE OUTPUT`.
//
// A source that exports `incomingHandler` (as app.js does, through marina.js) is built against the WIT of the
// wasmtime-wasi-http crate Marina serves with (found with `cargo metadata`, so the two always agree), in a world
// that adds the environment to wasi:http/proxy, for `marina.js`'s `env`. Any other source is a `fetch` event
// listener, which componentize-js builds against the wasi:http world of its own engine.

import { componentize } from '@bytecodealliance/componentize-js';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const [source, output] = process.argv.slice(2);
if (!source || !output) {
  console.error('usage: node build.mjs SOURCE.js OUTPUT.wasm');
  process.exit(2);
}
// The wasi:http version of the WIT in the wasmtime-wasi-http crate.
const CRATE_WASI = '0.2.12';
// The version componentize-js 0.23's engine exports its fetch event's handler under.
const FETCH_EVENT_WASI = '0.2.10';

const marinaStyle = /export\s+const\s+incomingHandler\b/.test(readFileSync(source, 'utf8'));
const world = marinaStyle
  ? `world app {\n  include wasi:http/proxy@${CRATE_WASI};\n  import wasi:cli/environment@${CRATE_WASI};\n}\n`
  : `world app {\n  include wasi:http/proxy@${FETCH_EVENT_WASI};\n}\n`;
const wit = witDir(marinaStyle ? CRATE_WASI : FETCH_EVENT_WASI, world);
try {
  const { component } = await componentize({ sourcePath: source, witPath: wit, worldName: 'app' });
  await writeFile(output, component);
} finally {
  rmSync(wit, { recursive: true, force: true });
}
console.log(`built ${output}`);

// A temporary WIT directory with `world` and the crate's WASI packages, relabelled as `version` (nothing a handler
// uses changed between the two versions).
function witDir(version, world) {
  const manifest = resolve(dirname(fileURLToPath(import.meta.url)), '../../Cargo.toml');
  const metadata = JSON.parse(
    execFileSync('cargo', ['metadata', '--format-version', '1', '--manifest-path', manifest], {
      maxBuffer: 64 * 1024 * 1024,
    }),
  );
  const http = metadata.packages.find((crate) => crate.name === 'wasmtime-wasi-http');
  const deps = join(dirname(http.manifest_path), 'wit', 'deps');
  const wit = mkdtempSync(join(tmpdir(), 'marina-js-wit-'));
  mkdirSync(join(wit, 'deps'));
  for (const file of readdirSync(deps)) {
    const text = readFileSync(join(deps, file), 'utf8');
    // The feature gates too: the one `@since(version = 0.2.12)` (an exit function no handler imports) would
    // otherwise name a version past the package's own.
    writeFileSync(join(wit, 'deps', file), text.replaceAll(CRATE_WASI, version));
  }
  writeFileSync(join(wit, 'world.wit'), `package marina:js;\n\n${world}`);
  return wit;
}
