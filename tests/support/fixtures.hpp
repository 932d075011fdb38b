// Reader for the text fixtures written by scripts/make_peft_fixtures.py (tests only).
#pragma once

#include <Eigen/Core>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>

namespace hra_test {

/// One fixture file: "key value" fields and named matrices.
///
/// Format (see scripts/make_peft_fixtures.py): lines starting with '#' are comments;
/// "matrix <name> <rows> <cols>" is followed by rows x cols numbers written ROW-MAJOR (row by
/// row, PyTorch's layout); "end" closes the file; every other line is "<key> <value>".
/// Matrices are returned with the same rows x cols as written, i.e. PyTorch's (n, d)
/// activations come back as n x d and must be transposed for Eigen's d x n batches.
struct Fixture {
  std::string path;
  std::map<std::string, std::string> fields;
  std::map<std::string, Eigen::MatrixXd> matrices;

  /// The matrix `name`, which must be rows x cols. Throws std::runtime_error otherwise.
  const Eigen::MatrixXd& matrix(const std::string& name, Eigen::Index rows,
                                Eigen::Index cols) const {
    const auto it = matrices.find(name);
    if (it == matrices.end())
      throw std::runtime_error("fixture " + path + ": no matrix '" + name + "'");
    if (it->second.rows() != rows || it->second.cols() != cols) {
      std::ostringstream os;
      os << "fixture " << path << ": matrix '" << name << "' is " << it->second.rows() << "x"
         << it->second.cols() << ", expected " << rows << "x" << cols;
      throw std::runtime_error(os.str());
    }
    return it->second;
  }

  const std::string& field(const std::string& key) const {
    const auto it = fields.find(key);
    if (it == fields.end())
      throw std::runtime_error("fixture " + path + ": no field '" + key + "'");
    return it->second;
  }

  long integer(const std::string& key) const {
    const std::string& text = field(key);
    char* end = nullptr;
    const long value = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0')
      throw std::runtime_error("fixture " + path + ": field '" + key + "' = '" + text +
                               "' is not an integer");
    return value;
  }
};

/// Reads a fixture file. A missing, truncated or malformed file throws std::runtime_error
/// whose message names the file (and the line), so a test using it fails loudly.
inline Fixture load_fixture(const std::string& path) {
  std::ifstream in(path);
  if (!in)
    throw std::runtime_error("cannot open fixture file '" + path +
                             "' (regenerate it with scripts/make_peft_fixtures.py)");
  Fixture f;
  f.path = path;
  std::string line;
  long line_no = 0;
  bool ended = false;
  const auto fail = [&](const std::string& what) {
    throw std::runtime_error("fixture " + path + ", line " + std::to_string(line_no) + ": " + what);
  };
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty() || line[0] == '#') continue;
    if (ended) fail("content after 'end'");
    std::istringstream ls(line);
    std::string key;
    ls >> key;
    if (key == "end") {
      ended = true;
      continue;
    }
    if (key == "matrix") {
      std::string name;
      long rows = -1, cols = -1;
      if (!(ls >> name >> rows >> cols) || rows < 0 || cols < 0)
        fail("expected 'matrix <name> <rows> <cols>'");
      Eigen::MatrixXd m(rows, cols);
      for (long i = 0; i < rows; ++i) {
        if (!std::getline(in, line)) fail("matrix '" + name + "' is truncated");
        ++line_no;
        std::istringstream row(line);
        for (long j = 0; j < cols; ++j)
          if (!(row >> m(i, j)))
            fail("matrix '" + name + "': row " + std::to_string(i) + " has fewer than " +
                 std::to_string(cols) + " values");
        std::string extra;
        if (row >> extra) fail("matrix '" + name + "': row " + std::to_string(i) + " is too long");
      }
      if (!f.matrices.emplace(name, std::move(m)).second) fail("duplicate matrix '" + name + "'");
      continue;
    }
    std::string value;
    if (!(ls >> value)) fail("expected '<key> <value>'");
    if (!f.fields.emplace(key, value).second) fail("duplicate field '" + key + "'");
  }
  if (!ended) fail("missing 'end' (truncated file?)");
  return f;
}

}  // namespace hra_test
