# Configures, builds and runs tests/consumer against hra (MODE=subdirectory|package), with the
# generator, compiler and build type of the build that runs the test (GENERATOR, CXX_COMPILER,
# CXX_FLAGS, BUILD_TYPE and, when set, GENERATOR_PLATFORM, GENERATOR_TOOLSET, MAKE_PROGRAM), as
# nlohmann/json's cmake_import tests do.
file(REMOVE_RECURSE ${WORK_DIR})
set(consumer_src ${CMAKE_CURRENT_LIST_DIR})
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGV}")
  endif()
endfunction()

set(configure_args -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER})
if(GENERATOR_PLATFORM)
  list(APPEND configure_args -A ${GENERATOR_PLATFORM})
endif()
if(GENERATOR_TOOLSET)
  list(APPEND configure_args -T ${GENERATOR_TOOLSET})
endif()
if(MAKE_PROGRAM)
  list(APPEND configure_args -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM})
endif()
if(CXX_FLAGS)
  list(APPEND configure_args -DCMAKE_CXX_FLAGS=${CXX_FLAGS})
endif()
set(config_args "")
if(BUILD_TYPE)
  list(APPEND configure_args -DCMAKE_BUILD_TYPE=${BUILD_TYPE})
  set(config_args --config ${BUILD_TYPE})  # multi-config generators pick the configuration here
endif()

if(MODE STREQUAL "package")
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/hra-build ${configure_args}
      -DHRA_BUILD_TESTS=OFF -DHRA_BUILD_BENCHMARKS=OFF -DHRA_BUILD_EXAMPLES=OFF -DHRA_INSTALL=ON
      -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/hra-build ${config_args})
  run(${CMAKE_COMMAND} -S ${consumer_src} -B ${WORK_DIR}/build ${configure_args} -DHRA_MODE=package
      -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
else()
  run(${CMAKE_COMMAND} -S ${consumer_src} -B ${WORK_DIR}/build ${configure_args}
      -DHRA_MODE=subdirectory -DHRA_SOURCE_DIR=${SOURCE_DIR})
endif()
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build ${config_args})
# Single-config generators put the program in the build directory, multi-config ones below it.
if(EXISTS ${WORK_DIR}/build/${BUILD_TYPE}/consumer)
  run(${WORK_DIR}/build/${BUILD_TYPE}/consumer)
else()
  run(${WORK_DIR}/build/consumer)
endif()
