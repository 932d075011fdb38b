# Configures, builds and runs tests/consumer against hra (MODE=subdirectory|package).
file(REMOVE_RECURSE ${WORK_DIR})
set(consumer_src ${CMAKE_CURRENT_LIST_DIR})
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGV}")
  endif()
endfunction()
if(MODE STREQUAL "package")
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/hra-build -DHRA_BUILD_TESTS=OFF
      -DHRA_BUILD_BENCHMARKS=OFF -DHRA_BUILD_EXAMPLES=OFF -DHRA_INSTALL=ON
      -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/hra-build)
  run(${CMAKE_COMMAND} -S ${consumer_src} -B ${WORK_DIR}/build -DHRA_MODE=package
      -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
else()
  run(${CMAKE_COMMAND} -S ${consumer_src} -B ${WORK_DIR}/build -DHRA_MODE=subdirectory
      -DHRA_SOURCE_DIR=${SOURCE_DIR})
endif()
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${WORK_DIR}/build/consumer)
