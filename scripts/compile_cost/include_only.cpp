// A user's file that includes the core and uses nothing (scripts/compile_cost.sh).
#include <hra/hra.hpp>

int main() {
  return 0;
}
