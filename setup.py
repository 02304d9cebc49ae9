"""Build of mpscy's native extension: the C ABI (objc/), the backends found on this machine,
and the Cython bridge. It prints which backends it built. Environment:
  MPSCY_CUDA=0|1       force the cuda backend off or on (default: on when nvcc is found)
  MPSCY_CUDA_ARCH=...  nvcc -gencode list, e.g. "90;80" (default: 80;90 plus PTX)
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


def find_nvcc():
    """Returns (nvcc path, cuda home) or (None, reason)."""
    flag = os.environ.get("MPSCY_CUDA")
    if flag == "0":
        return None, "MPSCY_CUDA=0"
    nvcc = shutil.which("nvcc") or next(iter(glob.glob("/usr/local/cuda/bin/nvcc")), None)
    if not nvcc:
        return None, "nvcc not found"
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return nvcc, home


def cuda_sources():
    return rel("objc/cuda/*.cu")


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
        if cu:
            nvcc, _ = find_nvcc()
            arch = os.environ.get("MPSCY_CUDA_ARCH", "80;90").split(";")
            gencode = []
            for a in arch:
                gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
            gencode += ["-gencode", f"arch=compute_{arch[-1]},code=compute_{arch[-1]}"]
            obj_dir = os.path.join(self.build_temp, "cuda")
            os.makedirs(obj_dir, exist_ok=True)
            for src in cu:
                obj = os.path.join(obj_dir, os.path.basename(src) + ".o")
                cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       "-DMPSCY_HAVE_CUDA", "-Iobjc", *gencode]
                print(" ".join(cmd))
                subprocess.check_call(cmd, cwd=HERE)
                ext.extra_objects.append(obj)
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
    macros, include_dirs, libraries, library_dirs, link_args, runtime_dirs = [], ["objc"], [], [], [], []
    compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno"]
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

    nvcc, home = find_nvcc()
    if nvcc and cuda_sources():
        sources += cuda_sources()
        macros.append(("MPSCY_HAVE_CUDA", None))
        include_dirs.append(os.path.join(home, "include"))
        for d in ("lib64", "lib"):
            if os.path.isdir(os.path.join(home, d)):
                library_dirs.append(os.path.join(home, d))
                runtime_dirs.append(os.path.join(home, d))
        libraries += ["cudart", "stdc++"]
        built.append("cuda")
    else:
        print(f"mpscy: cuda backend not built ({home if not nvcc else 'no objc/cuda sources'})")
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
    return Extension("mpscy._native", sources=sources, include_dirs=include_dirs,
                     define_macros=macros, libraries=libraries, library_dirs=library_dirs,
                     runtime_library_dirs=runtime_dirs, extra_compile_args=compile_args,
                     extra_link_args=link_args, language="c")


directives = {"language_level": 3, "boundscheck": DEBUG, "wraparound": DEBUG,
              "cdivision": True, "initializedcheck": DEBUG, "embedsignature": True}

setup(ext_modules=cythonize([extension()], compiler_directives=directives),
      cmdclass={"build_ext": BuildExt})
