// Run Python under the official MicroPython WebAssembly port (npm package
// @micropython/micropython-webassembly-pyscript), from Node.js.
//
//   node tests/mpy/run_wasm.mjs HEAP_BYTES CODE FILE...
//
// Every FILE is copied into the port's virtual file system under /fw (so
// `import nlnode` finds it), then CODE runs with /fw first on sys.path.
// Python's output goes to stdout; a Python exception prints its traceback to
// stderr and exits 1 (never the port's minified source).
import { readFileSync } from "node:fs";
import { basename } from "node:path";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";

const [heap, code, ...files] = process.argv.slice(2);
const mp = await loadMicroPython({
  heapsize: Number(heap),
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stderr.write(line + "\n"),
});
mp.FS.mkdir("/fw");
for (const file of files) {
  mp.FS.writeFile("/fw/" + basename(file), readFileSync(file));
}
try {
  mp.runPython("import sys\nsys.path.insert(0, '/fw')\n" + code);
} catch (error) {
  process.stderr.write(`${error.type ?? "Error"}: ${error.message}\n`);
  process.exit(1);
}
