// The one JSON parser of the file formats: nlohmann's, refusing the duplicate keys it would
// accept silently and nesting deep enough to exhaust the stack.
#pragma once

#include <cstddef>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "../../detail/checks.hpp"

namespace hra {
namespace detail {

/// What parse_strict_json() refuses besides invalid JSON, and the words its messages use.
struct JsonRules {
  int max_depth;         ///< containers nested this deep are refused before they are built
  const char* too_deep;  ///< e.g. "header JSON nests deeper than" (then " <max_depth> levels")
  const char* invalid;   ///< e.g. "header is not valid JSON" (then ": <nlohmann's message>")
};

/// \brief Parses `text` as a `Json` (nlohmann::json or nlohmann::ordered_json), refusing what
/// nlohmann accepts silently: a NUL byte (nlohmann stops reading at the first one and ignores
/// the rest), a key repeated in one object (nlohmann keeps the last one, Python too; a file
/// that means two things is refused here) and nesting of rules.max_depth or more.
///
/// Every refusal throws `Error` (an exception type constructible from a message) whose message
/// starts with `where`. For a repeated key the rest of the message is `duplicate(path, key)`:
/// `path` holds the key by which each open container was reached, outermost first, so
/// path.size() == 1 for a key of the root object and path[1] names the root's entry that holds
/// a deeper one.
template <typename Json, typename Error, typename DuplicateMessage>
Json parse_strict_json(std::string_view text, const std::string& where, const JsonRules& rules,
                       DuplicateMessage duplicate) {
  const std::size_t nul = text.find('\0');
  if (nul != std::string_view::npos)
    throw Error(concat(where, rules.invalid, ": NUL byte at offset ", nul,
                       " (JSON text may not contain one; nothing after it would be read)"));
  // One set of seen keys per open container (arrays get an unused set to keep depths aligned).
  std::vector<std::set<std::string>> seen;
  std::vector<std::string> path;
  std::string last_key;
  const auto callback = [&](int depth, typename Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        if (depth >= rules.max_depth)
          throw Error(concat(where, rules.too_deep, " ", rules.max_depth, " levels"));
        seen.emplace_back();
        path.push_back(depth == 0 ? std::string() : last_key);
        break;
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        if (!seen.empty()) seen.pop_back();
        if (!path.empty()) path.pop_back();
        break;
      case Json::parse_event_t::key: {
        const std::string& key = parsed.template get_ref<const std::string&>();
        if (!seen.empty() && !seen.back().insert(key).second)
          throw Error(concat(where, duplicate(path, key)));
        last_key = key;
        break;
      }
      case Json::parse_event_t::value:
        break;
    }
    return true;
  };
  try {
    return Json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true,
                       /*ignore_comments=*/false);
  } catch (const typename Json::exception& e) {
    throw Error(concat(where, rules.invalid, ": ", e.what()));
  }
}

}  // namespace detail
}  // namespace hra
