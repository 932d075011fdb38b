// The one way the tests assert an error: its exact type and substrings of its message.
#pragma once

#include <catch2/catch.hpp>

#include <exception>
#include <string>
#include <typeinfo>
#include <vector>

namespace hra_test {

/// Requires `f()` to throw exactly E (not a subclass, not a base) with every string of `parts`
/// in its message. The message is shown when a check fails.
template <typename E, typename F>
void expect_error(F&& f, const std::vector<std::string>& parts) {
  bool thrown = false;
  try {
    f();
  } catch (const std::exception& e) {
    thrown = true;
    INFO("message: " << e.what());
    CHECK(typeid(e) == typeid(E));
    for (const auto& p : parts) CHECK_THAT(std::string(e.what()), Catch::Matchers::Contains(p));
  }
  CHECK(thrown);
}

}  // namespace hra_test
