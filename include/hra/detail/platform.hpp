// The one place hra tests which operating system it is compiled for.
#pragma once

/// \def HRA_POSIX
/// 1 on a POSIX system (Linux and the other Unixes, macOS), where hra uses open/fsync/flock,
/// rename over symlinks and getpid (the file formats' crash-safe writes and bounded reads, the
/// thread pool's fork check); 0 elsewhere, where the standard library's portable but weaker
/// equivalents are used (no fsync, no lock; see docs/adapter_files.md, "Limits"). Every other
/// header tests this macro, never the compiler's own (__unix__, __APPLE__, _WIN32).
#if defined(__unix__) || defined(__APPLE__)
#define HRA_POSIX 1
#else
#define HRA_POSIX 0
#endif
