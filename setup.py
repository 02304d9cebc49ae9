"""Build of mpscy's native extension: the C ABI (objc/), the backends found on this machine,
and the Cython bridge. It prints which backends it built. Environment:
  MPSCY_CUDA=0|1       force the cuda backend off or on (default: on when nvcc, the CUDA runtime
                       and cuBLAS headers are found; otherwise it is skipped with the reason printed)
  MPSCY_CUDA_ARCH=...  nvcc -gencode list, e.g. "90;80" (default: 80;90 plus PTX of the last)
  MPSCY_CUBLAS_DIR=... a directory with include/cublasLt.h (default: the CUDA home, then the
                       nvidia-cublas wheel); cuBLASLt is loaded at run time, never linked
  MPSCY_METAL=0        leave the metal backend out (default: built on macOS 13+ with clang)
  MPSCY_DEBUG=1        Cython bounds/wraparound checks on, -O0 -g
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("MPSCY_DEBUG") == "1"
DARWIN = sys.platform == "darwin"


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def openblas():
    """scipy-openblas32 at build time: include dir, lib dir, library name, shared object."""
    import scipy_openblas32 as ob
    lib_dir = ob.get_lib_dir()
    so = [p for p in glob.glob(os.path.join(lib_dir, "lib" + ob.get_library() + "*"))
          if p.endswith((".so", ".dylib", ".dll"))]
    return ob.get_include_dir(), lib_dir, ob.get_library(), so[0]


def metal_build():
    """(True, "") when objc/metal/*.m is built: macOS 13 or newer and a clang compiler (the
    Objective-C needs ARC, which gcc lacks); else (False, reason). Linux never gets here."""
    if not DARWIN:
        return False, "not macOS"
    if os.environ.get("MPSCY_METAL") == "0":
        return False, "MPSCY_METAL=0"
    if not rel("objc/metal/*.m"):
        return False, "no objc/metal sources"
    version = platform.mac_ver()[0]
    major = int(version.split(".")[0]) if version else 0
    if major < 13:
        return False, f"macOS {version or 'version unknown'} is older than 13"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    try:
        banner = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        banner = ""
    if "clang" not in banner:
        return False, f"the C compiler {cc} is not clang"
    return True, ""


# Objective-C flags reach the .m files only: ARC, and the macOS the MPSGraph calls need.
METAL_FLAGS = ["-fobjc-arc", "-mmacosx-version-min=13.0"]


def _first(paths):
    return next((p for p in paths if p and os.path.exists(p)), None)


def _find_cublas(home):
    """(include dir, lib dir or "") holding cublasLt.h: $MPSCY_CUBLAS_DIR, the CUDA home, or
    NVIDIA's nvidia-cublas wheel importable by this Python."""
    roots = [os.environ.get("MPSCY_CUBLAS_DIR"), home]
    try:
        import nvidia  # namespace package of NVIDIA's wheels (nvidia/cu13/..., nvidia/cublas/...)
        for base in nvidia.__path__:
            roots += [os.path.join(base, d) for d in sorted(os.listdir(base))]
    except ImportError:
        pass
    for root in roots:
        if root and os.path.exists(os.path.join(root, "include", "cublasLt.h")):
            lib = _first([os.path.join(root, d) for d in ("lib64", "lib")]) or ""
            return os.path.join(root, "include"), lib
    return None, None


def find_cuda():
    """The cuda backend's build configuration, or (None, reason) when it cannot be built here.
    Needs nvcc, the CUDA runtime and cuBLAS headers; cuBLASLt itself is loaded at run time."""
    flag = os.environ.get("MPSCY_CUDA")
    if flag == "0":
        return None, "MPSCY_CUDA=0"
    if not cuda_sources():
        return None, "no objc/cuda sources"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = _first([os.path.join(home, "bin", "nvcc") if home else None, shutil.which("nvcc"),
                   "/usr/local/cuda/bin/nvcc"])
    if not nvcc:
        return None, "nvcc not found (put it on PATH or set CUDA_HOME)"
    homes = [home, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    home = _first([h for h in homes if h and os.path.exists(os.path.join(h, "include", "cuda_runtime.h"))])
    if not home:
        return None, f"cuda_runtime.h not found under {', '.join(h + '/include' for h in homes if h)}"
    libdir = _first([os.path.join(home, d) for d in ("lib64", "lib", "targets/x86_64-linux/lib")
                     if glob.glob(os.path.join(home, d, "libcudart*"))])
    if not libdir:
        return None, f"the CUDA runtime library (libcudart) not found under {home}"
    inc, lib = _find_cublas(home)
    if not inc:
        return None, ("cuBLAS headers (cublasLt.h) not found in the CUDA home, $MPSCY_CUBLAS_DIR or an "
                      "installed nvidia-cublas wheel (pip install nvidia-cublas, or mpscy[cuda])")
    major = "13"
    with open(os.path.join(inc, "cublas_api.h")) as f:
        for line in f:
            if line.startswith("#define CUBLAS_VER_MAJOR"):
                major = line.split()[2]
    static = os.path.exists(os.path.join(libdir, "libcudart_static.a"))
    return {"nvcc": nvcc, "home": home, "libdir": libdir, "cublas_inc": inc, "cublas_lib": lib,
            "soname": f"libcublasLt.so.{major}", "wheel_dir": f"cu{major}" if int(major) >= 13 else "cublas",
            "static": static}, None


def cuda_sources():
    return rel("objc/cuda/*.cu")


CUDA, CUDA_WHY = find_cuda()
# the runtime is linked statically when the toolkit has it, so only cuBLASLt is looked up at run time
CUDA_LIBS = ((["cudart_static", "dl", "rt", "pthread"] if CUDA["static"] else ["cudart"]) + ["stdc++"]) if CUDA else []


def nvcc_compile(build_temp):
    """Compiles every .cu with nvcc in parallel; returns the objects, or raises CalledProcessError."""
    arch = [a for a in os.environ.get("MPSCY_CUDA_ARCH", "80;90").split(";") if a]
    gencode = []
    for a in arch:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    gencode += ["-gencode", f"arch=compute_{arch[-1]},code=compute_{arch[-1]}"]
    obj_dir = os.path.join(build_temp, "cuda")
    os.makedirs(obj_dir, exist_ok=True)
    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-DMPSCY_HAVE_CUDA", "-Iobjc",
             "-I" + CUDA["cublas_inc"], f'-DMPSCY_CUBLASLT_SONAME="{CUDA["soname"]}"',
             f'-DMPSCY_CUBLASLT_DIR="{CUDA["cublas_lib"]}"', f'-DMPSCY_CUBLAS_WHEEL_DIR="{CUDA["wheel_dir"]}"',
             *(["-lineinfo", "-g"] if DEBUG else []),
             *(["-lineinfo"] if os.environ.get("MPSCY_CUDA_LINEINFO") and not DEBUG else []), *gencode]
    jobs = [(src, os.path.join(obj_dir, os.path.basename(src) + ".o")) for src in cuda_sources()]
    from concurrent.futures import ThreadPoolExecutor

    def one(job):
        cmd = [CUDA["nvcc"], "-c", job[0], "-o", job[1], *flags]
        print(" ".join(cmd))
        r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed on {job[0]}:\n{r.stderr[-4000:]}")
        return job[1]

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(one, jobs))


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc (CuPy's pattern) and .m sources apart with the
    Objective-C flags, and bundles OpenBLAS next to the extension so it is found through an
    $ORIGIN rpath, not as a runtime dependency."""

    def build_extension(self, ext):
        cu = [s for s in ext.sources if s.endswith(".cu")]
        objc = [s for s in ext.sources if s.endswith(".m")]
        ext.sources = [s for s in ext.sources if not s.endswith((".cu", ".m"))]
        if objc:
            # compiled apart so that -fobjc-arc never reaches the C sources (the Cython one included)
            ext.depends = sorted(set(ext.depends) | set(objc) | set(rel("objc/metal/*.h")))
            ext.extra_objects += self.compiler.compile(
                objc, output_dir=self.build_temp, macros=ext.define_macros,
                include_dirs=ext.include_dirs, debug=self.debug,
                extra_postargs=[*ext.extra_compile_args, *METAL_FLAGS])
        if CUDA and ("MPSCY_HAVE_CUDA", None) in ext.define_macros:
            try:
                ext.extra_objects += nvcc_compile(self.build_temp)
                print("mpscy: cuda backend built (cuBLASLt is loaded at run time: "
                      f"{CUDA['soname']}, headers from {CUDA['cublas_inc']})")
            except Exception as e:  # installing never fails because part of CUDA is missing
                if os.environ.get("MPSCY_CUDA") == "1":
                    raise
                print(f"mpscy: cuda backend not built: {e}\nmpscy: building backends: cpu only")
                ext.define_macros.remove(("MPSCY_HAVE_CUDA", None))
                for lib in CUDA_LIBS:
                    if lib in ext.libraries:
                        ext.libraries.remove(lib)
        super().build_extension(ext)

    def _blas_mapping(self):
        """(bundled copy in build_lib, copy beside the in-place extension) of OpenBLAS."""
        if DARWIN:
            return []
        _, _, _, so = openblas()
        build_py = self.get_finalized_command("build_py")
        out = []
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            name = os.path.basename(so)
            out.append((so, os.path.join(os.path.dirname(regular_file), name),
                        os.path.join(os.path.dirname(inplace_file), name)))
        return out

    def run(self):
        super().run()
        for so, regular, inplace in self._blas_mapping():
            os.makedirs(os.path.dirname(regular), exist_ok=True)
            shutil.copy2(so, regular)
            if self.inplace:
                shutil.copy2(so, inplace)

    def get_outputs(self):
        outs = super().get_outputs()
        if self.inplace:
            return outs
        return sorted(outs + [regular for _, regular, _ in self._blas_mapping()])

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace:
            mapping.update({regular: inplace for _, regular, inplace in self._blas_mapping()})
        return mapping


def extension():
    sources = ["src/mpscy/_native.pyx", "objc/mpscy.c", *rel("objc/null/*.c"),
               *rel("objc/common/*.c"), *rel("objc/cpu/*.c")]
    macros, include_dirs, libraries, library_dirs, link_args, runtime_dirs = [], ["objc", "src/mpscy"], [], [], [], []
    # -ffp-contract=off: a product and the sum that takes it are rounded apart, never fused into
    # one multiply-add, in every clone of a loop (cpu.h's CPU_SIMD: the avx512f clone, which has
    # FMA, contracted the optimizers' element rules, so the cpu's bits depended on the host's
    # vector ISA); the cuda backend rounds them the same way (common/optim_math.h), so both take
    # bit-identical steps from the same gradients. -fno-trapping-math: no code here reads the
    # floating-point exception flags, and without it GCC keeps a select of two computed floats as
    # a branch, which stops the activation loops (cpu/vmath.h) from vectorizing; values are the same
    compile_args = ["-O0", "-g", "-ffp-contract=off"] if DEBUG else ["-O3", "-fno-math-errno", "-fno-trapping-math",
                                                                     "-ffp-contract=off"]
    built = ["cpu"]
    if DARWIN:
        macros.append(("ACCELERATE_NEW_LAPACK", None))
        link_args += ["-framework", "Accelerate"]
    else:
        inc, lib_dir, lib, _ = openblas()
        include_dirs.append(inc)
        library_dirs.append(lib_dir)
        libraries.append(lib)
        link_args.append("-Wl,-rpath,$ORIGIN")

    if CUDA:
        macros.append(("MPSCY_HAVE_CUDA", None))
        library_dirs.append(CUDA["libdir"])
        if not CUDA["static"]:
            runtime_dirs.append(CUDA["libdir"])
        libraries += CUDA_LIBS
        sources += rel("objc/cuda/*.c")   # host-compiler C of the backend (stage.c)
        built.append("cuda")
    elif os.environ.get("MPSCY_CUDA") == "1":
        sys.exit(f"mpscy: MPSCY_CUDA=1 but the cuda backend cannot be built: {CUDA_WHY}")
    else:
        print(f"mpscy: cuda backend not built ({CUDA_WHY})")
    metal, why = metal_build()
    if metal:
        sources += rel("objc/metal/*.m")
        macros.append(("MPSCY_HAVE_METAL", None))
        # CoreGraphics: without it MTLCreateSystemDefaultDevice returns nil outside an app
        for fw in ("Foundation", "CoreGraphics", "Metal", "MetalPerformanceShaders",
                   "MetalPerformanceShadersGraph"):
            link_args += ["-framework", fw]
        built.append("metal")
    elif DARWIN:
        print(f"mpscy: metal backend not built ({why})")
    print("mpscy: building backends: " + ", ".join(built))
    depends = rel("objc/*.h") + rel("objc/*/*.h") + rel("objc/*/*.cuh") + cuda_sources()
    return Extension("mpscy._native", sources=sources, depends=depends, include_dirs=include_dirs,
                     define_macros=macros, libraries=libraries, library_dirs=library_dirs,
                     runtime_library_dirs=runtime_dirs, extra_compile_args=compile_args,
                     extra_link_args=link_args, language="c")


directives = {"language_level": 3, "boundscheck": DEBUG, "wraparound": DEBUG,
              "cdivision": True, "initializedcheck": DEBUG, "embedsignature": True}

setup(ext_modules=cythonize([extension()], compiler_directives=directives),
      cmdclass={"build_ext": BuildExt})
