# Runs PROGRAM --data DATA --out OUT and passes only if it exits non-zero with the
# data set's installation hint on stderr (and did not crash with a signal).
execute_process(
  COMMAND ${PROGRAM} --data ${DATA} --out ${OUT}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
if(rc EQUAL 0)
  message(FATAL_ERROR "expected a failure for a missing data set, got exit code 0\n${out}")
endif()
if(NOT rc MATCHES "^[0-9]+$")
  message(FATAL_ERROR "the program crashed (${rc}) instead of failing cleanly\n${err}")
endif()
if(NOT err MATCHES "apt-get install dataset-fashion-mnist")
  message(FATAL_ERROR "the error does not say how to install the data set:\n${err}")
endif()
message(STATUS "failed as expected (exit ${rc}): ${err}")
